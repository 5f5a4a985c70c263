"""`data.cache=true`: VAE latents (both flips) and text-encoder outputs, computed once and
stored on disk, so training runs only the UNet.

A cache lives in `<cache_dir>/<key>/`, the key a hash of the base model (name, VAE and
text-encoder configs, a sample of their weights, their dtypes and the autocast precision),
the data files (paths, sizes, mtimes), the chosen samples and the transform settings: a later
run or sweep with the same inputs reuses it, any change makes a new one. What is stored is
the VAE's `latent_dist.parameters` (mean and log-variance, (8, h, w)), so training samples its
latents with its own generator exactly as when encoding on the fly.

Under DDP each rank encodes its share (samples i = rank, rank + world, ...) into its own
shard files; rank 0 then writes the index and the manifest and renames the folder into place.
Nothing is encoded twice. `cache_dir` must be a folder every rank sees.

The manifest records each file's size and sha256. Before a cache is used, rank 0 checks them:
a cache that was truncated, emptied or lost its manifest or index is rebuilt, with a warning
that says what was wrong. Build folders (`<key>.partial-*`) left by a killed run are removed
once nothing has written to them for `STALE_PARTIAL_S`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from sdft.data.sampler import world

log = logging.getLogger(__name__)
FORMAT_VERSION = 2  # bump when the layout below changes (2: the manifest holds checksums)
STALE_PARTIAL_S = 3600  # a build folder untouched this long belongs to a run that died


class CacheableDataset(Protocol):
    """What a dataset offers to be cached: keys `(i, flip)`, a caption without loading the
    image, every caption it can ever return, and each sample's pixel size."""

    def __len__(self) -> int: ...
    def __getitem__(self, key: tuple) -> dict: ...
    def caption(self, key: tuple) -> str: ...
    def all_captions(self) -> list[str]: ...
    def image_size(self, i: int) -> tuple[int, int]: ...


# -- the key -----------------------------------------------------------------------------
def _weights_sample(module: torch.nn.Module) -> str:
    # the first values of every tensor: another checkpoint behind the same name or folder
    # differs in all of them; reading 16 numbers per tensor keeps this instant
    h = hashlib.sha256()
    for name, p in module.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().flatten()[:16].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def model_identity(pipeline, precision: str) -> dict:
    """What of the base model decides the cached values."""
    vae, text = pipeline.vae, pipeline.text_encoder
    text_cfg = {
        k: v
        for k, v in text.config.to_dict().items()
        if k not in ("transformers_version", "_name_or_path", "dtype", "torch_dtype")
    }
    return {
        "name_or_path": pipeline.name_or_path,
        "vae": {k: v for k, v in dict(vae.config).items() if not k.startswith("_")},
        "text_encoder": text_cfg,
        "tokenizer": [len(pipeline.tokenizer), pipeline.tokenizer.model_max_length],
        "weights": [_weights_sample(vae), _weights_sample(text)],
        "dtypes": [str(vae.dtype), str(text.dtype)],
        "precision": precision,
        "device": vae.device.type,  # GPU convolutions (TF32, cuDNN) give other last bits
    }


def file_stats(files: Sequence[str | Path]) -> list:
    out = []
    for f in sorted({str(f) for f in files}):
        st = os.stat(f)
        out.append([f, st.st_size, st.st_mtime_ns])
    return out


def cache_key(model: dict, data: dict) -> str:
    """Hash of the model identity and the data signature (`files` are stat'ed here)."""
    data = {**data, "files": file_stats(data.get("files", []))}
    blob = json.dumps([FORMAT_VERSION, model, data], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


# -- storage: .npy files, bf16 kept as its raw bits ----------------------------------------
def _to_numpy(x: torch.Tensor) -> np.ndarray:
    x = x.detach().cpu()
    if x.dtype == torch.bfloat16:  # numpy has no bf16: keep the exact bits
        return x.view(torch.int16).numpy()
    return x.numpy()


def _from_numpy(a: np.ndarray, bf16: bool) -> torch.Tensor:
    t = torch.from_numpy(np.array(a))  # copy out of the memory map
    return t.view(torch.bfloat16) if bf16 else t


class _ShardWriter:
    """Rows of one array written straight into a .npy file (allocated at the first write)."""

    def __init__(self, path: Path, rows: int):
        self.path, self.rows, self.array = path, rows, None

    def write(self, row: int, values: torch.Tensor) -> None:  # values: (n, ...)
        if self.array is None:
            if values.dtype == torch.bfloat16:  # the reader knows the dtype by this name
                self.path = self.path.with_suffix(".bf16.npy")
            a = _to_numpy(values[:1])
            self.array = np.lib.format.open_memmap(
                self.path, mode="w+", dtype=a.dtype, shape=(self.rows, *a.shape[1:])
            )
        self.array[row : row + len(values)] = _to_numpy(values)

    def close(self) -> str:
        assert self.array is not None and self.array.shape[0] == self.rows
        self.array.flush()
        self.array = None
        return self.path.name


# -- building ----------------------------------------------------------------------------
def _broadcast(obj):
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


@torch.no_grad()
def _encode_latents(
    dataset: CacheableDataset,
    ids: list[int],
    flips: int,
    pipeline,
    out: Path,
    batch_size: int,
    num_workers: int,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> dict[int, list]:
    """Encode samples `ids` (each with `flips` variants) into one shard per pixel size;
    returns {sample: [shard file, row]}."""
    vae = pipeline.vae
    by_size: dict[tuple[int, int], list[int]] = {}
    for i in ids:
        by_size.setdefault(tuple(dataset.image_size(i)), []).append(i)
    rank = world()[0]
    rows: dict[int, list] = {}
    for (h, w), group in sorted(by_size.items()):
        writer = _ShardWriter(out / f"latents_{h}x{w}_rank{rank}.npy", len(group))
        chunks = [group[k : k + batch_size] for k in range(0, len(group), batch_size)]
        keys = [[(i, bool(f)) for i in chunk for f in range(flips)] for chunk in chunks]
        loader = DataLoader(
            dataset,
            batch_sampler=keys,
            num_workers=num_workers,
            pin_memory=vae.device.type == "cuda",
        )
        row = 0
        for batch in loader:
            pixels = batch["pixel_values"].to(vae.device, vae.dtype)  # (n * flips, 3, H, W)
            with autocast():
                params = vae.encode(pixels).latent_dist.parameters  # (n * flips, 8, h, w)
            params = params.reshape(-1, flips, *params.shape[1:])  # (n, flips, 8, h, w)
            writer.write(row, params)
            row += len(params)
        name = writer.close()
        rows.update({i: [name, r] for r, i in enumerate(group)})
    return rows


@torch.no_grad()
def _encode_captions(
    captions: list[str],
    pipeline,
    out: Path,
    batch_size: int,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> dict[str, list]:
    if not captions:
        return {}
    tok, text = pipeline.tokenizer, pipeline.text_encoder
    writer = _ShardWriter(out / f"text_rank{world()[0]}.npy", len(captions))
    for k in range(0, len(captions), batch_size):
        ids = tok(
            captions[k : k + batch_size],
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(text.device)
        with autocast():
            writer.write(k, text(ids)[0])  # (n, 77, D), as AdapterFineTuner.encode_prompt
    name = writer.close()
    return {c: [name, r] for r, c in enumerate(captions)}


def build_or_load(
    dataset: CacheableDataset,
    pipeline,
    cache_dir: str | Path,
    signature: dict,
    flip: bool,
    batch_size: int = 8,
    num_workers: int = 0,
    precision: str = "32-true",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> CachedDataset:
    """The cached version of `dataset`: loaded if this key exists, else built (every rank its
    share). `signature` holds the data files, the samples and the transform settings."""
    key = cache_key(model_identity(pipeline, precision), {**signature, "flip": flip})
    final = Path(cache_dir).expanduser() / key
    rank, size = world()
    # rank 0 decides for all: another run may finish the same cache while we look
    todo = None
    if rank == 0:
        remove_stale_partials(final.parent)
        damage = cache_damage(final) if final.exists() else "not built yet"
        if damage is not None:
            if final.exists():
                log.warning("latent cache %s is damaged (%s): rebuilding it", final, damage)
                shutil.rmtree(final)
            todo = f"{key}.partial-{uuid.uuid4().hex[:8]}"
            (final.parent / todo).mkdir(parents=True)
    todo = _broadcast(todo)
    if todo is None:
        log.info("latent cache: reusing %s", final)
        return CachedDataset(dataset, final)

    tmp = final.parent / todo
    t0 = time.perf_counter()
    mine = list(range(rank, len(dataset), size))
    captions = sorted(set(dataset.all_captions()))
    log.info("latent cache: encoding %d samples x %d flips on rank %d", len(mine), 1 + flip, rank)
    shards = {
        "latents": _encode_latents(
            dataset, mine, 1 + flip, pipeline, tmp, batch_size, num_workers, autocast
        ),
        "text": _encode_captions(captions[rank::size], pipeline, tmp, batch_size, autocast),
        "encoded": len(mine),
    }
    (tmp / f"index_rank{rank}.json").write_text(json.dumps(shards))
    _barrier()
    if rank == 0:
        _finish(tmp, final, size, signature, time.perf_counter() - t0, flip)
    _barrier()
    return CachedDataset(dataset, final)


def _finish(tmp: Path, final: Path, size: int, signature: dict, seconds: float, flip: bool):
    parts = [json.loads((tmp / f"index_rank{r}.json").read_text()) for r in range(size)]
    latents = {int(i): v for p in parts for i, v in p["latents"].items()}
    text = {c: v for p in parts for c, v in p["text"].items()}
    files = sorted({f for f, _ in [*latents.values(), *text.values()]})
    fid = {f: n for n, f in enumerate(files)}
    index = np.array([[fid[latents[i][0]], latents[i][1]] for i in range(len(latents))])
    np.save(tmp / "latent_index.npy", index.reshape(-1, 2).astype(np.int64))
    manifest = {
        "format": FORMAT_VERSION,
        "checksums": {f: file_checksum(tmp / f) for f in [*files, "latent_index.npy"]},
        "files": files,
        "captions": {c: [fid[f], r] for c, (f, r) in sorted(text.items())},
        "num_samples": len(latents),
        "flips": 1 + flip,
        "encoded_per_rank": [p["encoded"] for p in parts],
        "build_seconds": round(seconds, 3),
        "settings": signature.get("settings", {}),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    try:
        tmp.rename(final)
    except OSError:  # another run built the same cache meanwhile: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("latent cache: built %s in %.1f s", final, seconds)


# -- checking ----------------------------------------------------------------------------
def file_checksum(path: Path) -> list:
    """[size in bytes, sha256]: the size catches a truncated file at once, the hash the rest."""
    with open(path, "rb") as f:
        return [path.stat().st_size, hashlib.file_digest(f, "sha256").hexdigest()]


def cache_damage(root: Path) -> str | None:
    """Why the cache at `root` cannot be used as it is (None: it matches its manifest)."""
    try:
        manifest = json.loads((root / "manifest.json").read_text())
        checksums = manifest["checksums"] if manifest["format"] == FORMAT_VERSION else None
    except FileNotFoundError:
        return "no manifest.json"
    except (ValueError, KeyError, TypeError) as e:  # JSON, UTF-8, missing or odd fields
        return f"unreadable manifest.json ({type(e).__name__}: {e})"
    if checksums is None:
        return f"format {manifest['format']}, not {FORMAT_VERSION}"
    for name, (size, digest) in checksums.items():
        path = root / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
        if file_checksum(path)[1] != digest:
            return f"{name} does not match its sha256 in the manifest"
    return None


def remove_stale_partials(cache_dir: Path) -> None:
    """Remove build folders of runs that died (killed mid-encoding): nothing in them has
    changed for STALE_PARTIAL_S. A build in progress keeps writing its files."""
    for folder in cache_dir.glob("*.partial-*"):
        try:
            times = [p.stat().st_mtime for p in [folder, *folder.iterdir()]]
        except OSError:  # renamed into place or removed meanwhile
            continue
        if time.time() - max(times) > STALE_PARTIAL_S:
            log.info("latent cache: removing %s, left by a run that stopped", folder)
            shutil.rmtree(folder, ignore_errors=True)


# -- reading -----------------------------------------------------------------------------
class CachedDataset(Dataset):
    """`dataset`'s samples as cached tensors: `latent_params` (8, h, w), `encoder_hidden_states`
    (77, D) and `caption`; the same keys `(i, flip[, epoch])` as the dataset it wraps."""

    def __init__(self, dataset: CacheableDataset, root: Path):
        self.dataset, self.root = dataset, Path(root)
        self.manifest = json.loads((self.root / "manifest.json").read_text())
        self.index = np.load(self.root / "latent_index.npy")
        if len(self.index) != len(dataset):
            raise RuntimeError(f"{self.root}: {len(self.index)} samples cached, not {len(dataset)}")
        self._arrays: dict[int, np.ndarray] = {}  # opened lazily: once per dataloader worker

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def build_seconds(self) -> float:
        return self.manifest["build_seconds"]

    def _row(self, file_id: int, row: int) -> torch.Tensor:
        if file_id not in self._arrays:
            self._arrays[file_id] = np.load(
                self.root / self.manifest["files"][file_id], mmap_mode="r"
            )
        return _from_numpy(
            self._arrays[file_id][row], self.manifest["files"][file_id].endswith(".bf16.npy")
        )

    def __getitem__(self, key: tuple) -> dict:
        i, flip = key[0], key[1]
        caption = self.dataset.caption(key)
        try:
            text_at = self.manifest["captions"][caption]
        except KeyError:
            raise KeyError(f"caption {caption!r} is not in the cache {self.root}") from None
        latents = self._row(*self.index[i])  # (flips, 8, h, w)
        return {
            "latent_params": latents[int(flip)],
            "encoder_hidden_states": self._row(*text_at),
            "caption": caption,
        }
