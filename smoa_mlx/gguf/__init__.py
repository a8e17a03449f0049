"""GGUF files, llama.cpp's format: one name table (`names`) shared by the writer
(`fuse --export-gguf`) and the reader."""

from .names import permute, unpermute
from .write import write_gguf

__all__ = ["permute", "unpermute", "write_gguf"]
