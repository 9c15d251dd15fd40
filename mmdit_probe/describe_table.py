"""The table :func:`mmdit_probe.describe` returns, and the rows every family shares (components, run defaults)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["COLUMNS", "Description", "DescriptionRow", "block_rows", "call_default", "component_rows", "encoder_device",
           "format_value", "layer_spans", "module_rows", "run_default", "run_value", "schedule_rows"]

COLUMNS = ("section", "item", "value", "source")


@dataclass(frozen=True)
class DescriptionRow:
    """One entry: ``value`` is a Python object (int, tuple shape, str, list); ``source`` says where it came from."""

    section: str
    item: str
    value: Any
    source: str


@dataclass(frozen=True)
class Description:
    """The rows of :func:`describe`; ``.table`` / ``to_dataframe()`` as a DataFrame, ``str()`` as text."""

    rows: tuple[DescriptionRow, ...]

    @property
    def table(self):
        import pandas as pd

        return pd.DataFrame([(r.section, r.item, r.value, r.source) for r in self.rows], columns=list(COLUMNS))

    def to_dataframe(self):
        return self.table

    def value(self, section: str, item: str) -> Any:
        """The value of one entry; ``KeyError`` lists the items of that section."""
        for r in self.rows:
            if r.section == section and r.item == item:
                return r.value
        have = [r.item for r in self.rows if r.section == section]
        raise KeyError(f"no item {item!r} in section {section!r}; items: {have}")

    def section(self, name: str) -> dict[str, Any]:
        return {r.item: r.value for r in self.rows if r.section == name}

    def to_text(self, sources: bool = True) -> str:
        lines: list[str] = []
        width = max((len(r.item) for r in self.rows), default=0)
        for sec in dict.fromkeys(r.section for r in self.rows):
            lines.append(f"== {sec} ==")
            for r in self.rows:
                if r.section == sec:
                    src = f"   [{r.source}]" if sources and r.source else ""
                    lines.append(f"  {r.item:<{width}}  {format_value(r.value)}{src}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()

    def _repr_html_(self) -> str:  # notebooks
        return self.table.assign(value=self.table["value"].map(format_value)).to_html(index=False)


def format_value(v: Any) -> str:
    """Shapes as ``77×768``, big integers with thousands separators, floats short."""
    if isinstance(v, torch.Size):
        v = tuple(v)
    if isinstance(v, tuple) and v and all(isinstance(x, int) for x in v):
        return "×".join(str(x) for x in v)
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(format_value(x) for x in v) + "]"
    return str(v)


# ------------------------------------------------------------------------------------------------ helpers


def call_default(pipe: Any, name: str) -> Any:
    """Default of a ``pipe(...)`` keyword, read from its signature."""
    return inspect.signature(type(pipe).__call__).parameters[name].default


def run_size(pipe: Any, height: int | None, width: int | None, max_sequence_length: int | None,
             num_inference_steps: int | None) -> tuple[int, int, tuple[int, str], tuple[int, str]]:
    """``(height, width, (length, source), (steps, source))`` of a described run: the sizes given, else the
    pipeline's default image size; run keywords as :func:`run_default` reads them."""
    default = pipe.default_sample_size * pipe.vae_scale_factor
    return (int(height or default), int(width or default), run_default(pipe, "max_sequence_length", max_sequence_length),
            run_default(pipe, "num_inference_steps", num_inference_steps))


def run_default(pipe: Any, name: str, given: int | None = None) -> tuple[int, str]:
    """``(value, source)`` of run keyword ``name``: ``given``, else the pipeline's shipped run kwargs
    (``pipe.shipped_run_kwargs``, as ``default_run_kwargs(pipe)``), else the ``pipe(...)`` default."""
    if given:
        return int(given), "argument"
    shipped = getattr(pipe, "shipped_run_kwargs", None) or {}
    if name in shipped:
        return int(shipped[name]), "the model's run kwargs (pipe.shipped_run_kwargs = default_run_kwargs(pipe))"
    return int(call_default(pipe, name)), f"pipe(...) default of {name}"


def run_value(pipe: Any, name: str) -> tuple[Any, str]:
    """``(value, source)`` of any run keyword (not only ints): the shipped run kwargs, else the ``pipe(...)`` default."""
    shipped = getattr(pipe, "shipped_run_kwargs", None) or {}
    if name in shipped:
        return shipped[name], "the model's run kwargs (pipe.shipped_run_kwargs)"
    return call_default(pipe, name), f"pipe(...) default of {name}"


def layer_spans(kinds: list[str]) -> str:
    """``["joint", "joint", "single"]`` → ``"joint 0–1, single 2–2"``: each block kind's first and last layer."""
    return ", ".join(f"{k} {kinds.index(k)}–{len(kinds) - 1 - kinds[::-1].index(k)}" for k in dict.fromkeys(kinds))


def block_rows(pipe: Any, family: Any, order_source: str) -> list[DescriptionRow]:
    """Blocks of a double-/single-stream MMDiT (Flux.1, Chroma, Qwen-Image, Flux.2): counts, the kind of every layer
    (execution order, as the recorder numbers them), joint order, heads and qk-norms of the first block's ``attn``."""
    tr = pipe.transformer
    kinds = family.block_kinds(tr)
    attn = family.blocks(tr)[0].attn
    heads, inner = attn.heads, attn.inner_dim
    rows = [
        DescriptionRow("transformer", "class", type(tr).__name__, "type(pipe.transformer)"),
        DescriptionRow("transformer", "double-stream blocks", len(tr.transformer_blocks),
                       "len(transformer.transformer_blocks) (joint attention of two streams)"),
    ]
    n_single = kinds.count("single")
    if n_single:
        rows.append(DescriptionRow("transformer", "single-stream blocks", n_single,
                                   "len(transformer.single_transformer_blocks) (joined sequence, attention ∥ MLP)"))
    return rows + [
        DescriptionRow("transformer", "block kinds by layer", layer_spans(kinds),
                       "layer = execution order: double-stream blocks, then single-stream blocks"),
        DescriptionRow("transformer", "joint order", family.order, order_source),
        DescriptionRow("transformer", "heads × head dim", f"{heads} × {inner // heads} = {inner}",
                       "attn.heads, attn.inner_dim"),
        DescriptionRow("transformer", "qk-norm (image)", type(attn.norm_q).__name__, "type(attn.norm_q)"),
        DescriptionRow("transformer", "qk-norm (text)", type(getattr(attn, "norm_added_q", None)).__name__,
                       "type(attn.norm_added_q) of the double-stream blocks"),
    ]


def schedule_rows(pipe: Any, steps: int, steps_source: str, schedule: tuple[list[float], list[float], float | None],
                  how: str, mu_source: str) -> list[DescriptionRow]:
    """The ``scheduler`` section from a family's ``(timesteps, sigmas, mu)`` (:meth:`Family.schedule`); ``how`` says
    how the pipeline sets them, ``mu_source`` how it computes ``mu``."""
    cfg = pipe.scheduler.config
    timesteps, sigmas, mu = schedule
    dynamic = bool(cfg.get("use_dynamic_shifting", False))
    return [
        DescriptionRow("scheduler", "class", type(pipe.scheduler).__name__, "type(pipe.scheduler)"),
        DescriptionRow("scheduler", "shift", cfg.get("shift"),
                       "scheduler.config.shift" + (" (unused: dynamic)" if dynamic else "")),
        DescriptionRow("scheduler", "dynamic shifting", dynamic, "scheduler.config.use_dynamic_shifting"),
        DescriptionRow("scheduler", "mu", None if mu is None else round(float(mu), 4),
                       mu_source + ("" if dynamic else " (unused: static shift)")),
        DescriptionRow("scheduler", "num_train_timesteps", cfg.get("num_train_timesteps"), "scheduler.config"),
        DescriptionRow("scheduler", "num_inference_steps", steps, steps_source),
        DescriptionRow("scheduler", "timesteps", [round(t, 2) for t in timesteps],
                       how + ", on a deep copy of pipe.scheduler"),
        DescriptionRow("scheduler", "sigmas", [round(s, 4) for s in sigmas],
                       "the copy's scheduler.sigmas (last entry: the final, noise-free sigma)"),
    ]


def module_rows(name: str, module: Any) -> list[DescriptionRow]:
    if module is None:
        return [DescriptionRow("components", name, None, f"pipe.{name} is None (omitted)")]
    rows = [DescriptionRow("components", f"{name}.class", type(module).__name__, f"type(pipe.{name})")]
    if isinstance(module, torch.nn.Module):
        params = list(module.parameters())
        first = params[0] if params else None
        rows += [
            DescriptionRow("components", f"{name}.parameters", sum(p.numel() for p in params), "sum of p.numel()"),
            DescriptionRow("components", f"{name}.dtype", str(first.dtype) if first is not None else None, "first parameter"),
            DescriptionRow("components", f"{name}.device", str(first.device) if first is not None else None, "first parameter"),
        ]
    elif hasattr(module, "__len__") and "tokenizer" in name:
        rows.append(DescriptionRow("components", f"{name}.vocab", len(module), f"len(pipe.{name})"))
    return rows


def component_rows(pipe: Any) -> list[DescriptionRow]:
    rows: list[DescriptionRow] = []
    for name, module in pipe.components.items():
        if module is None and name in ("image_encoder", "feature_extractor"):
            continue  # IP-adapter parts, absent in every SD3 / Flux checkpoint
        rows += module_rows(name, module)
    return rows


def encoder_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device
