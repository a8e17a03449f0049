"""An Ollama `Modelfile` beside a GGUF export (`ollama create NAME -f Modelfile`).

Ollama never runs Jinja: on `ollama create` it swaps the GGUF's `tokenizer.chat_template` for
one of its own Go templates when one is within a small edit distance (template/index.json),
and otherwise prompts with the bare text (`{{ .Prompt }}`, roles lost). So the Modelfile
states the template: the model's chat template rendered with placeholder messages gives the
pieces around the system text, the prompt and the response, written as Ollama's per-turn
template (`{{ .System }}`, `{{ .Prompt }}`, `{{ .Response }}`, which Ollama repeats per turn);
a default system prompt the template inserts becomes `SYSTEM`; the end-of-turn and turn-start
special tokens become `PARAMETER stop`. A template that does not decompose this way (e.g. one
that folds the system text into the first user turn) is left to Ollama's own detection, and
the Modelfile says so.
"""

from __future__ import annotations

from pathlib import Path

from ..files import atomic_write

_SYS, _P1, _R1, _P2 = "\ue000SYSTEM\ue000", "\ue000PROMPT1\ue000", "\ue000RESPONSE1\ue000", "\ue000PROMPT2\ue000"


def _pieces(render, system: bool):
    """The text between the placeholders of a two-turn chat, or None if they are not in order."""
    messages = [{"role": "user", "content": _P1}, {"role": "assistant", "content": _R1},
                {"role": "user", "content": _P2}]
    if system:
        messages.insert(0, {"role": "system", "content": _SYS})
    try:
        text = render(messages)
    except Exception:  # a template that refuses these roles (e.g. no system role) has no pieces
        return None
    pieces = []
    for mark in ([_SYS] if system else []) + [_P1, _R1, _P2]:
        head, sep, text = text.partition(mark)
        if not sep:
            return None
        pieces.append(head)
    return pieces + [text]


def ollama_template(render, bos: str | None = None):
    """(TEMPLATE, default SYSTEM or None) for the chat template behind `render(messages) -> str`
    (with the generation prompt), or None if it does not decompose into per-turn pieces.
    `bos`: the BOS text the tokenizer adds itself, dropped from the template's start."""
    with_sys, without = _pieces(render, True), _pieces(render, False)
    if with_sys is None or without is None:
        return None
    a, b, c, d, e = with_sys
    first, c2, d2, e2 = without
    if bos:
        a, first = a.removeprefix(bos), first.removeprefix(bos)
    if not (c == e == c2 == e2 and d == d2):
        return None
    if first and b.endswith(first) and d.endswith(first):  # no default system: `first` opens a user turn
        user, system = first, None
    elif first.startswith(a) and first.endswith(b) and len(first) > len(a) + len(b):  # a default system
        user, system = "", first[len(a):len(first) - len(b)]
    elif not first:
        user, system = "", None
    else:
        return None
    sys_end, turn_end = b[:len(b) - len(user)], d[:len(d) - len(user)]
    template = (f"{{{{ if .System }}}}{a}{{{{ .System }}}}{sys_end}{{{{ end }}}}"
                f"{user}{{{{ .Prompt }}}}{c}{{{{ .Response }}}}{turn_end}")
    return template, system


def _quoted(text: str) -> str | None:
    return None if '"""' in text else f'"""{text}"""'


def modelfile_text(gguf_name: str, tokenizer) -> str:
    """The Modelfile for `gguf_name` with the chat template of the HF `tokenizer`."""
    lines = [f"FROM ./{gguf_name}"]
    found = None
    if getattr(tokenizer, "chat_template", None):
        def render(messages):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        bos = tokenizer.bos_token if tokenizer.encode("a")[:1] == [tokenizer.bos_token_id] else None
        found = ollama_template(render, bos)
    if found is None or _quoted(found[0]) is None or (found[1] and _quoted(found[1]) is None):
        lines.append("# TEMPLATE: none written (the chat template does not split into turns); Ollama uses its "
                     "own template when it recognises the GGUF's tokenizer.chat_template")
        stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    else:
        template, system = found
        lines.append(f"TEMPLATE {_quoted(template)}")
        if system:
            lines.append(f"SYSTEM {_quoted(system)}")
        specials = [t for t in tokenizer.all_special_tokens if t]
        specials += [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
                     if getattr(t, "special", False)]
        turn_text = template.split("{{ .Response }}")[1] + template.split("{{ .Prompt }}")[0].split("{{ end }}")[-1]
        stops = [tokenizer.eos_token] + sorted({t for t in specials if t in turn_text}, key=turn_text.index)
    for stop in dict.fromkeys(s for s in stops if s):
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"


def write_modelfile(directory, gguf_name: str, tokenizer) -> Path:
    path = Path(directory) / "Modelfile"
    text = modelfile_text(gguf_name, tokenizer)
    return atomic_write(path, lambda tmp: tmp.write_text(text))
