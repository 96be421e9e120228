"""Routing instead of merging (``loralego route``; needs ``loralego[tune]``), after LoraRetriever (arXiv 2402.09997).

A router holds one prototype per adapter: the normalised mean of the sentence embeddings of that adapter's
example prompts, from a local sentence encoder (mean pooling over tokens, then L2 normalisation, as
all-MiniLM-L6-v2 is used). An input goes to the adapters whose prototypes are most similar (cosine).
:class:`RoutedModel` serves a batch with a PEFT model holding the adapters: each input by its top-1 adapter
(PEFT's mixed-adapter batches, ``adapter_names=``), or by a fusion of its top-k adapters merged with a chosen
method, each fused set merged once and cached as another adapter of the model.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .adapters.atomic import atomic_folder
from .errors import LoraLegoError
from .examples import Example, check_tasks, split_holdout

ROUTER_CONFIG = "router.json"
ROUTER_TENSORS = "prototypes.safetensors"
FORMAT_VERSION = 1


class SentenceEncoder:
    """Mean-pooled, L2-normalised embeddings from a local Hugging Face encoder folder."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", batch_size: int = 64) -> None:
        from .causal_lm import require

        transformers = require("transformers")
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise LoraLegoError(f"--encoder {folder}: not a local model folder (no config.json)")
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
            self.model = transformers.AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        except (OSError, ValueError, KeyError) as error:
            raise LoraLegoError(f"--encoder {folder}: cannot load: {' '.join(str(error).split())[:300]}") from None
        self.model.to(device).eval()
        self.path = folder
        self.batch_size = batch_size

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                   max_length=256, return_tensors="pt").to(device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros((0, 0))


def prototypes(embeddings: torch.Tensor, tasks: Sequence[str], names: Sequence[str]) -> torch.Tensor:
    """One normalised mean embedding per adapter name; refuses an adapter without examples."""
    rows = []
    for name in names:
        index = [i for i, task in enumerate(tasks) if task == name]
        if not index:
            raise LoraLegoError(f"adapter {name}: no example names it as its task; a router needs one at least")
        rows.append(torch.nn.functional.normalize(embeddings[index].mean(0), dim=-1))
    return torch.stack(rows)


@dataclass
class Router:
    names: list[str]
    prototypes: torch.Tensor  # n_adapters x dim, unit rows
    encoder: str  # the encoder folder the prototypes were made with
    adapters: list[str]  # where the adapters were loaded from (for RoutedModel.from_router)
    heldout_accuracy: float | None = None
    _encoder: SentenceEncoder | None = None

    def similarities(self, texts: Sequence[str]) -> torch.Tensor:
        if self._encoder is None:
            self._encoder = SentenceEncoder(self.encoder)
        return self._encoder.embed(texts) @ self.prototypes.T

    def top_k(self, texts: Sequence[str], k: int = 1) -> list[list[int]]:
        """The ``k`` best adapters of each text, best first (ties: lower index first)."""
        if not 1 <= k <= len(self.names):
            raise LoraLegoError(f"top-k: k must be in [1, {len(self.names)}], got {k}")
        scores = self.similarities(texts)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        return order[:, :k].tolist()

    def save(self, out: str | Path, *, force: bool = False) -> Path:
        config = {
            "format_version": FORMAT_VERSION,
            "adapters": self.names,
            "adapter_paths": self.adapters,
            "encoder": self.encoder,
            "pooling": "mean",
            "normalize": True,
            "heldout_accuracy": self.heldout_accuracy,
        }
        with atomic_folder(Path(out), force=force) as folder:
            save_file({"prototypes": self.prototypes.contiguous()}, str(folder / ROUTER_TENSORS))
            (folder / ROUTER_CONFIG).write_text(json.dumps(config, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        return Path(out)

    @classmethod
    def load(cls, path: str | Path) -> Router:
        folder = Path(path)
        try:
            config = json.loads((folder / ROUTER_CONFIG).read_text(encoding="utf-8"))
            tensor = load_file(str(folder / ROUTER_TENSORS))["prototypes"]
        except FileNotFoundError as error:
            raise LoraLegoError(f"{folder}: not a router folder ({Path(error.filename).name} missing)") from None
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as error:
            raise LoraLegoError(f"{folder}: cannot read the router: {error}") from None
        names = config.get("adapters")
        if (not isinstance(names, list) or tensor.ndim != 2 or tensor.shape[0] != len(names)
                or config.get("format_version") != FORMAT_VERSION):
            raise LoraLegoError(f"{folder}: router files disagree (adapters vs prototypes) or unknown version")
        return cls(list(names), tensor.float(), str(config["encoder"]), list(config.get("adapter_paths", [])),
                   config.get("heldout_accuracy"))


def retrieval_accuracy(router_prototypes: torch.Tensor, embeddings: torch.Tensor, tasks: Sequence[str],
                       names: Sequence[str]) -> float:
    best = (embeddings @ router_prototypes.T).argmax(1).tolist()
    return sum(names[b] == t for b, t in zip(best, tasks, strict=True)) / max(len(tasks), 1)


def build_router(encoder_path: str | Path, examples: Sequence[Example], names: Sequence[str],
                 adapter_paths: Sequence[str], *, holdout: float = 0.2, seed: int = 0,
                 device: str = "cpu") -> Router:
    """Prototypes from all examples; ``heldout_accuracy``: top-1 accuracy on a held-out share when the
    prototypes are built from the rest (None when nothing is held out)."""
    check_tasks(examples, names, required=True, source="--examples")
    encoder = SentenceEncoder(encoder_path, device)
    train, held = split_holdout(examples, holdout, seed)
    accuracy = None
    if held:
        train_proto = prototypes(encoder.embed([e.prompt for e in train]), [e.task for e in train], names)
        held_emb = encoder.embed([e.prompt for e in held])
        accuracy = retrieval_accuracy(train_proto, held_emb, [str(e.task) for e in held], names)
    embeddings = encoder.embed([e.prompt for e in examples])
    proto = prototypes(embeddings, [str(e.task) for e in examples], names)
    return Router(list(names), proto, str(Path(encoder_path).resolve()), list(adapter_paths), accuracy, encoder)


def _fused_name(indices: Sequence[int]) -> str:
    return "fused_" + "_".join(str(i) for i in indices)


class RoutedModel:
    """A PEFT model holding the router's adapters, under the router's names; serves each input of a batch
    with its own adapter (top-1) or with a cached fusion of its top-k adapters."""

    def __init__(self, peft_model: Any, router: Router, *, adapters: Sequence[Any] | None = None,
                 top_k: int = 1, fusion_method: str = "cat", fusion_options: dict[str, Any] | None = None) -> None:
        missing = [n for n in router.names if n not in peft_model.peft_config]
        if missing:
            raise LoraLegoError(f"the PEFT model has no adapter named {missing[0]!r} (router adapters: "
                                f"{', '.join(router.names)})")
        self.model = peft_model
        self.router = router
        self.top_k = top_k
        self.fusion_method = fusion_method
        self.fusion_options = dict(fusion_options or {})
        self._sources = list(adapters) if adapters is not None else None  # loralego adapters, for fusions
        self._fused: dict[tuple[int, ...], str] = {}

    @classmethod
    def from_router(cls, base_model: Any, router: Router, **kwargs: Any) -> RoutedModel:
        """Load the router's adapters (from the paths it recorded) into ``base_model`` with PEFT."""
        from .causal_lm import require

        peft = require("peft")
        if len(router.adapters) != len(router.names):
            raise LoraLegoError("the router records no adapter paths; load the adapters and use RoutedModel()")
        model = None
        for name, path in zip(router.names, router.adapters, strict=True):
            if model is None:
                model = peft.PeftModel.from_pretrained(base_model, path, adapter_name=name)
            else:
                model.load_adapter(path, adapter_name=name)
        model.eval()
        return cls(model, router, **kwargs)

    def _fusion(self, indices: tuple[int, ...]) -> str:
        """The PEFT adapter name of a fused set, merged and loaded on first use."""
        if len(indices) == 1:
            return self.router.names[indices[0]]
        if indices not in self._fused:
            from . import load, merge

            sources = self._sources or [load(self.router.adapters[i]) for i in range(len(self.router.names))]
            options = {"weights": [1.0 / len(indices)] * len(indices), "dtype": "float32", **self.fusion_options}
            merged = merge([sources[i] for i in indices], method=self.fusion_method, **options)
            name = _fused_name(indices)
            with tempfile.TemporaryDirectory() as tmp:
                merged.save(Path(tmp) / name)
                self.model.load_adapter(str(Path(tmp) / name), adapter_name=name)
            self._fused[indices] = name
        return self._fused[indices]

    def adapter_names(self, texts: Sequence[str], top_k: int | None = None) -> list[str]:
        """The PEFT adapter serving each text (a fused set is sorted, so one merge serves every order)."""
        k = self.top_k if top_k is None else top_k
        return [self._fusion(tuple(sorted(best))) for best in self.router.top_k(texts, k)]

    def __call__(self, texts: Sequence[str], *, top_k: int | None = None, **model_inputs: Any) -> Any:
        """Forward ``model_inputs`` (a batch whose rows are ``texts``), each row through its own adapter."""
        return self.model(**model_inputs, adapter_names=self.adapter_names(texts, top_k))

    def generate(self, texts: Sequence[str], *, top_k: int | None = None, **model_inputs: Any) -> Any:
        return self.model.generate(**model_inputs, adapter_names=self.adapter_names(texts, top_k))
