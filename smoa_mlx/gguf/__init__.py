"""GGUF files, llama.cpp's format: one name table (`names`) shared by the writer
(`fuse --export-gguf`, with `vocab` and an Ollama `modelfile`) and the reader."""

from .modelfile import write_modelfile
from .names import permute, unpermute
from .write import default_file_name, model_hparams, out_type, write_gguf

__all__ = ["default_file_name", "model_hparams", "out_type", "permute", "unpermute", "write_gguf", "write_modelfile"]
