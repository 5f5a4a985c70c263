"""The real CLIP tokenizer, rebuilt offline from the BPE vocabulary that open_clip ships.

SD1.x uses openai/clip-vit-large-patch14's tokenizer; open_clip's
`bpe_simple_vocab_16e6.txt.gz` holds the same 48,894 merges, so the vocab.json /
merges.txt pair that `transformers.CLIPTokenizer` reads can be derived from it
exactly ("a scribble of apple" -> [49406, 320, 2139, 5924, 539, 3055, 49407]).
"""

from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

NUM_MERGES = 49152 - 256 - 2  # vocab 49408 = 256 bytes x 2 (+"</w>") + merges + 2 specials


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte -> printable unicode map (so BPE never sees raw control bytes).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _open_clip_bpe_path() -> Path:
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"open_clip does not ship {path.name} (looked at {path})")
    return path


def _cache_dir() -> Path:
    root = os.environ.get("SDFT_CACHE", Path.home() / ".cache" / "sdft")
    return Path(root) / "clip_tokenizer"


def write_clip_tokenizer_files(out_dir: Path) -> Path:
    """Write vocab.json and merges.txt of the CLIP tokenizer into `out_dir`."""
    lines = gzip.open(_open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : NUM_MERGES + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".vocab.{os.getpid()}.json"
    tmp.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    os.replace(tmp, out_dir / "vocab.json")
    tmp = out_dir / f".merges.{os.getpid()}.txt"
    tmp.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", "utf-8")
    os.replace(tmp, out_dir / "merges.txt")
    config = {"model_max_length": 77, "pad_token": "<|endoftext|>", "do_lower_case": True}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return out_dir


@lru_cache(maxsize=1)
def clip_tokenizer() -> CLIPTokenizer:
    """SD's CLIP tokenizer (77 tokens, padded with <|endoftext|>), built with no network."""
    d = _cache_dir()
    if not (d / "tokenizer_config.json").is_file():
        write_clip_tokenizer_files(d)
    return CLIPTokenizer.from_pretrained(str(d))
