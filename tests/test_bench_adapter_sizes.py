"""bench/adapter_sizes.py: the README's file sizes, from files each method's config exports
(here on the tiny model, whose layer widths are known)."""

import adapter_sizes


def tensor_bytes(size: int, path) -> int:
    """A safetensors file's size minus its 8-byte length and JSON header."""
    with open(path, "rb") as f:
        return size - 8 - int.from_bytes(f.read(8), "little")


def test_sizes_are_those_of_the_exported_files_and_fill_the_table(tmp_path):
    variants = [("lora", []), ("lora", ["method.save_dtype=float16"]), ("textual_inversion", [])]
    rows = adapter_sizes.export_sizes("tiny", variants, tmp_path)
    assert [(r["method"], r["file"]) for r in rows] == [
        ("lora", "pytorch_lora_weights.safetensors"),
        ("lora", "scribble.safetensors"),
        ("lora", "pytorch_lora_weights.safetensors"),
        ("lora", "scribble.safetensors"),
        ("textual_inversion", "learned_embeds.safetensors"),
        ("textual_inversion", "qd-scribble.safetensors"),
    ]
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert sorted(r["size"] for r in rows) == sorted(f.stat().st_size for f in files)
    # LoRA r4 on 32 projections of width C (in = out = C: 32 in three blocks, 64 in the middle
    # one): 8 layers x 4 x 2C per block -> 64 x (3 x 32 + 64) = 10240 weights, less 2 x 4 x 32
    # for the middle block's cross-attention to_k/to_v (they read 32-wide text) = 9984; 32 alphas
    kohya = tmp_path / "00_lora" / "scribble.safetensors"
    assert tensor_bytes(rows[1]["size"], kohya) == (9984 + 32) * 4
    half = tmp_path / "01_lora" / "scribble.safetensors"
    assert tensor_bytes(rows[3]["size"], half) == (9984 + 32) * 2
    emb = tmp_path / "02_textual_inversion" / "qd-scribble.safetensors"
    assert tensor_bytes(rows[5]["size"], emb) == 32 * 4  # one 32-wide vector

    table = adapter_sizes.markdown(rows, "tiny").splitlines()
    assert table[2:4] == ["| method | setting | file | size |", "|---|---|---|---|"]
    assert table[5] == (
        f"| `lora` | defaults | `scribble.safetensors` (kohya/A1111/LyCORIS) "
        f"| {rows[1]['size'] / 1e3:.1f} KB |"
    )
    assert len(table) == 4 + len(rows)
