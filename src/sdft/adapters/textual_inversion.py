"""Textual Inversion: new tokens whose embedding vectors are the only thing that trains.

Update rule: the text encoder's embedding matrix E (V x D) grows by n rows e_1..e_n for the
placeholder tokens ("<x>", "<x>_1", ..., as diffusers names them), initialised from an
existing word's embedding; only those rows train, so every row of the real vocabulary stays
bit-identical. Captions must contain the placeholder (e.g.
`data.caption_template="a <scribble> of {category}"`); a multi-vector placeholder expands to
all its tokens. Files: `learned_embeds.safetensors` ({placeholder: (n, D)}, diffusers'
`load_textual_inversion`) and `<name>.safetensors` ({"emb_params": (n, D)}, kohya and
A1111, where the file name is the word to use in prompts: the placeholder without the
characters a file name cannot hold, `<qd-scribble>` -> `qd-scribble.safetensors`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file
from torch import nn

from sdft.adapters import export
from sdft.adapters.load import is_embedding, read_safetensors
from sdft.adapters.metadata import kohya_metadata
from sdft.files import atomic_path


class PlaceholderEmbedding(nn.Embedding):
    """A token embedding whose rows from `first_id` on come from the trainable `vectors`.

    `weight` (the whole vocabulary, placeholder rows included) is frozen; the rows that may
    change are exactly the ids >= first_id, an explicit mask in `forward`. Keeping them in a
    parameter of their own means the optimiser (and weight decay) never sees the real
    vocabulary, and checkpoints hold n x D numbers, not V x D."""

    def __init__(self, base: nn.Embedding, init: torch.Tensor):
        weight = torch.cat([base.weight.detach(), init.to(base.weight.dtype)])
        super().__init__(*weight.shape, _weight=weight, _freeze=True)
        self.first_id = base.num_embeddings
        self.vectors = nn.Parameter(init.detach().clone().float())  # (n, D), trains in fp32
        self.checked = False

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(input_ids)  # (B, T, D) from the frozen matrix
        trainable = input_ids >= self.first_id  # (B, T): the rows that may change
        if not self.checked and self.vectors.requires_grad and torch.is_grad_enabled():
            self.checked = True  # the first training batch: without the token nothing trains
            if not trainable.any():
                raise ValueError(
                    "textual inversion: no caption of the first batch holds the placeholder "
                    "token; put it in the captions (e.g. data.caption_template='a <x> of "
                    "{category}', data.instance_prompt='a <x> scribble')"
                )
        new = self.vectors[(input_ids - self.first_id).clamp(min=0)].to(out.dtype)
        return torch.where(trainable[..., None], new, out)

    @torch.no_grad()
    def sync(self) -> None:
        """Copy the trained vectors into `weight`, so the plain matrix holds them too."""
        self.weight[self.first_id :] = self.vectors.to(self.weight.dtype)


def in_vocabulary(tokenizer, word: str) -> bool:
    """Whether `word` is already one token (CLIP stores whole words as "word</w>")."""
    vocab = tokenizer.get_vocab()
    return word in vocab or f"{word.lower()}</w>" in vocab


def a1111_name(placeholder: str) -> str:
    """A file name (A1111's prompt word) from a placeholder: `<qd-scribble>` -> `qd-scribble`."""
    name = re.sub(r"[^0-9A-Za-z_.-]+", "_", placeholder).strip("._")
    if not name:
        raise ValueError(
            f"method.placeholder={placeholder!r} leaves no file name; add letters or digits "
            "(or set method.output_name)"
        )
    return name


def read_embedding_file(path: Path) -> torch.Tensor:
    """The (n, D) vectors of a diffusers, kohya or A1111 safetensors embedding file."""
    tensors, _ = read_safetensors(path)
    if not is_embedding(tensors):
        raise ValueError(f"{path}: not a textual-inversion embedding (keys {list(tensors)[:3]})")
    emb = tensors.get("emb_params", next(iter(tensors.values())))
    return emb[None] if emb.dim() == 1 else emb


class TextualInversionMethod:
    """Learn `num_vectors` embedding rows for a new `placeholder` token."""

    name = "textual_inversion"

    def __init__(
        self,
        placeholder: str = "<concept>",
        initializer: str = "sketch",
        num_vectors: int = 1,
        init_weights: str | None = None,
        save_dtype: str = "float32",
        output_name: str | None = None,
    ):
        if not placeholder.strip() or " " in placeholder:
            raise ValueError(f"method.placeholder={placeholder!r} must be one word, e.g. '<x>'")
        if not isinstance(num_vectors, int) or num_vectors <= 0:
            raise ValueError(f"method.num_vectors={num_vectors!r} must be a positive integer")
        if init_weights is not None and not Path(init_weights).expanduser().is_file():
            raise FileNotFoundError(f"method.init_weights={init_weights!r}: no such file")
        self.placeholder, self.initializer, self.num_vectors = placeholder, initializer, num_vectors
        self.init_weights = init_weights
        # A1111's trigger word is the file's name: the placeholder's, not a common word
        self.output_name = output_name or a1111_name(placeholder)
        self.save_torch_dtype = export.check_save_dtype(save_dtype)

    @property
    def tokens(self) -> list[str]:
        return [self.placeholder] + [f"{self.placeholder}_{i}" for i in range(1, self.num_vectors)]

    def describe(self) -> dict:
        return {
            "name": self.name,
            "placeholder": self.placeholder,
            "initializer": self.initializer,
            "num_vectors": self.num_vectors,
        }

    def initial_vectors(self, pipe: StableDiffusionPipeline) -> torch.Tensor:
        embedding = pipe.text_encoder.get_input_embeddings()
        if self.init_weights:
            vectors = read_embedding_file(Path(self.init_weights).expanduser())
            if vectors.shape != (self.num_vectors, embedding.embedding_dim):
                raise ValueError(
                    f"method.init_weights={self.init_weights!r} holds vectors of shape "
                    f"{tuple(vectors.shape)}; this method needs "
                    f"({self.num_vectors}, {embedding.embedding_dim})"
                )
            return vectors
        ids = pipe.tokenizer.encode(self.initializer, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(
                f"method.initializer={self.initializer!r} is {len(ids)} tokens; "
                "pick a word that is a single token"
            )
        return embedding.weight[ids[0]].detach().float().expand(self.num_vectors, -1)

    def apply(self, pipe: StableDiffusionPipeline) -> None:
        """Add the placeholder tokens and their trainable rows; nothing else requires grad."""
        tokenizer = pipe.tokenizer
        taken = [t for t in self.tokens if in_vocabulary(tokenizer, t)]
        if taken:
            raise ValueError(
                f"method.placeholder={self.placeholder!r}: {taken} already in the tokenizer's "
                "vocabulary; pick a new string such as '<my-concept>'"
            )
        init = self.initial_vectors(pipe)
        tokenizer.add_tokens(self.tokens)
        ids = tokenizer.convert_tokens_to_ids(self.tokens)
        base = pipe.text_encoder.get_input_embeddings()
        assert ids == list(range(base.num_embeddings, base.num_embeddings + self.num_vectors))
        pipe.text_encoder.set_input_embeddings(PlaceholderEmbedding(base, init))
        pipe.text_encoder.config.vocab_size = len(tokenizer)

    def vectors(self, pipe: StableDiffusionPipeline) -> torch.Tensor:
        embedding = pipe.text_encoder.get_input_embeddings()
        embedding.sync()
        return embedding.vectors.detach().to("cpu", self.save_torch_dtype).contiguous()

    def save(
        self, pipe: StableDiffusionPipeline, out_dir: str | Path, metadata: dict | None = None
    ) -> list[Path]:
        """Write `learned_embeds.safetensors` (diffusers) and `<output_name>.safetensors`
        (kohya/A1111 `emb_params`, named after the placeholder by default), each atomically."""
        vectors = self.vectors(pipe)
        out = Path(out_dir)
        network = {
            "network_module": "textual_inversion",
            "placeholder": self.placeholder,
            "num_vectors": self.num_vectors,
            "output_name": self.output_name,
        }
        meta = kohya_metadata(pipe, network, metadata)
        files = [
            (out / "learned_embeds.safetensors", {self.placeholder: vectors}),
            (out / f"{self.output_name}.safetensors", {"emb_params": vectors}),
        ]
        for path, tensors in files:
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata=meta)
        return [path for path, _ in files]
