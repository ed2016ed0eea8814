"""Streaming difference-in-means extraction: :func:`extract_means`.

One forward pass per length bucket of prompts (all groups mixed). A forward pre-hook on each
needed decoder block gathers only the wanted token positions ``hidden[:, positions, :]``
(``[batch, n_positions, d_model]``, never a copy of ``[batch, seq, d_model]``) and adds each
row into its group's fp32 partial sum with :func:`refusal_fast.ops.group_accumulate_`.
The pre-hook of the last needed block raises a private exception, so no later block, final
norm or LM head is ever computed. After each batch the fp32 partials are folded into float64
totals; counts are kept on the host. Memory is therefore independent of the number of prompts.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import chat
from .artifacts import ArtifactError, check_writable, library_version
from .fingerprint import check_identity, model_identity
from .means import Means, prompt_set_hash
from .models import ModelAdapter, block_input, get_adapter

__all__ = ["extract_means", "Means"]

DEFAULT_CHECKPOINT_EVERY = 50  # batches

#: Test seam: when set, called with the number of finished batches after each batch (and after
#: any checkpoint written for it). Not part of the API.
_after_batch: Callable[[int], None] | None = None


class _StopForward(Exception):
    """Raised by the last needed block's pre-hook to end the forward early."""


# ---------------------------------------------------------------------------- validation
def _check_groups(groups: Any) -> tuple[list[str], list[list[str]]]:
    if not isinstance(groups, Mapping):
        raise TypeError(f"groups must be a dict {{name: list of prompts}}, got {type(groups).__name__}")
    if len(groups) == 0:
        raise ValueError("groups is empty; give at least one group of prompts")
    names, lists = [], []
    for name, prompts in groups.items():
        if not isinstance(name, str):
            raise TypeError(f"group names must be str, got {name!r}")
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise TypeError(f"group {name!r} must be a list of prompt strings, got {type(prompts).__name__}")
        if len(prompts) == 0:
            raise ValueError(f"group {name!r} is empty")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"group {name!r}, prompt {i}: expected str, got {type(p).__name__}")
        names.append(name)
        lists.append(list(prompts))
    return names, lists


def _check_positions(positions: Any, default: list[int]) -> list[int]:
    if positions is None:
        return list(default)
    if hasattr(positions, "__index__") and not isinstance(positions, (bool, torch.Tensor)):
        positions = [positions]
    if isinstance(positions, (str, bytes)) or not isinstance(positions, (Sequence, torch.Tensor)):
        raise TypeError(f"positions must be a list of negative ints, got {type(positions).__name__}")
    out = []
    for p in (positions.reshape(-1).tolist() if isinstance(positions, torch.Tensor) else positions):
        if isinstance(p, bool) or not hasattr(p, "__index__"):
            raise TypeError(f"positions must be ints (negative offsets from the prompt end), got {p!r}")
        p = int(p.__index__())
        if p >= 0:
            raise ValueError(
                f"position {p} is not a negative offset; positions count back from the end of the "
                f"prompt (-1 = last token), e.g. {default}"
            )
        out.append(p)
    if not out:
        raise ValueError("positions is empty")
    if len(set(out)) != len(out):
        raise ValueError(f"duplicate positions: {out}")
    return sorted(out)


def _check_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _dist_info(distributed: bool | None) -> tuple[int, int]:
    import torch.distributed as dist

    ready = dist.is_available() and dist.is_initialized()
    if distributed is None:
        distributed = ready
    if distributed and not ready:
        raise ValueError("distributed=True but torch.distributed is not initialised (call init_process_group)")
    return (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)


def _ordered_hash(prompts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()


# ---------------------------------------------------------------------------- state
class _State:
    """Running float64 totals ``[n_layers, G*P, d]`` (+ second moments), fp32 partials, host counts.

    Tensors are allocated lazily on the device where each layer's activations live (so
    ``device_map`` models work); float64 totals stay on that device when it supports float64.
    """

    def __init__(self, n_layers: int, n_groups: int, n_pos: int, d: int, sm_slots: Mapping[int, int]):
        self.L, self.G, self.P, self.d = n_layers, n_groups, n_pos, d
        self.sm_slots = dict(sm_slots)  # layer slot -> second-moment slot
        self.partial: list[torch.Tensor | None] = [None] * n_layers
        self.totals: list[torch.Tensor | None] = [None] * n_layers
        self.second: list[torch.Tensor | None] = [None] * len(self.sm_slots)
        self.counts = [0] * n_groups
        self.batches_done = 0

    @staticmethod
    def _total_device(device: torch.device) -> torch.device:
        return device if device.type in ("cpu", "cuda") else torch.device("cpu")

    def buffers(self, li: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """fp32 partial ``[G*P, d]`` and (if any) float64 second-moment totals ``[G, P, d, d]``."""
        acc = self.partial[li]
        if acc is None or acc.device != device:
            acc = self.partial[li] = torch.zeros(self.G * self.P, self.d, dtype=torch.float32, device=device)
        tdev = self._total_device(device)
        tot = self.totals[li]
        if tot is None:
            self.totals[li] = torch.zeros(self.G * self.P, self.d, dtype=torch.float64, device=tdev)
        elif tot.device != tdev:
            self.totals[li] = tot.to(tdev)
        sm = None
        si = self.sm_slots.get(li)
        if si is not None:
            sm = self.second[si]
            if sm is None:
                sm = self.second[si] = torch.zeros(self.G, self.P, self.d, self.d, dtype=torch.float64, device=tdev)
            elif sm.device != tdev:
                sm = self.second[si] = sm.to(tdev)
        return acc, sm

    def fold(self) -> None:
        """Add the fp32 partials into the float64 totals and zero them."""
        for acc, tot in zip(self.partial, self.totals):
            if acc is not None:
                assert tot is not None, "buffers() allocates a layer's totals with its partial"
                tot.add_(acc.to(tot.device))
                acc.zero_()

    def zero_partials(self) -> None:
        for acc in self.partial:
            if acc is not None:
                acc.zero_()

    def sums(self) -> torch.Tensor:
        """Float64 sums ``[L, G, P, d]`` on the CPU."""
        out = torch.zeros(self.L, self.G * self.P, self.d, dtype=torch.float64)
        for li, tot in enumerate(self.totals):
            if tot is not None:
                out[li] = tot.cpu()
        return out.view(self.L, self.G, self.P, self.d)

    def second_moments(self, sm_layers: Sequence[int]) -> dict[int, torch.Tensor]:
        out = {}
        for layer, t in zip(sm_layers, self.second):
            out[layer] = t.cpu() if t is not None else torch.zeros(self.G, self.P, self.d, self.d, dtype=torch.float64)
        return out

    def load(self, means: Means, sm_layers: Sequence[int]) -> None:
        sums = torch.stack([means.sum(g) for g in means.groups], dim=1)  # [L, G, P, d]
        for li in range(self.L):
            self.totals[li] = sums[li].reshape(self.G * self.P, self.d).contiguous()
        for si, layer in enumerate(sm_layers):
            self.second[si] = means.second_moment_sums(layer)
        self.counts = [means.count(g) for g in means.groups]

    def nbytes(self) -> int:
        ts = [t for t in (*self.partial, *self.totals, *self.second) if t is not None]
        return sum(t.nbytes for t in ts)


class _Batch:
    """Host-side description of the current batch; device index tensors are cached per device."""

    def __init__(self, row_groups: list[int], n_pos: int, positions: list[int]):
        self.row_groups = row_groups
        self.n_pos = n_pos
        self.positions = positions
        self._cache: dict[Any, Any] = {}
        present = sorted(set(row_groups))
        self.group_rows = {g: [i for i, rg in enumerate(row_groups) if rg == g] for g in present}

    def index(self, device: torch.device) -> torch.Tensor:
        """Accumulator row for each gathered row: ``group * P + p``, ``[batch * P]`` int64."""
        key = ("index", device)
        if key not in self._cache:
            # a normal (non-inference) tensor, so ops' index range check runs once per batch, not per layer
            with torch.inference_mode(False):
                g = torch.tensor(self.row_groups, dtype=torch.int64)
                idx = (g[:, None] * self.n_pos + torch.arange(self.n_pos)[None, :]).reshape(-1)
                self._cache[key] = idx.to(device)
        return self._cache[key]

    def gather_index(self, seq_len: int, device: torch.device) -> torch.Tensor:
        key = ("pos", seq_len, device)
        if key not in self._cache:
            self._cache[key] = torch.tensor([seq_len + p for p in self.positions], dtype=torch.int64).to(device)
        return self._cache[key]

    def rows(self, g: int, device: torch.device) -> torch.Tensor | None:
        """Row indices of group ``g`` (None when the whole batch is that group)."""
        if len(self.group_rows) == 1:
            return None
        key = ("rows", g, device)
        if key not in self._cache:
            self._cache[key] = torch.tensor(self.group_rows[g], dtype=torch.int64).to(device)
        return self._cache[key]


@contextlib.contextmanager
def _capture(adapter, layers: list[int], state: _State, current: dict, deterministic: bool):
    """Register pre-hooks on the blocks of ``layers``; always removed on exit."""
    from . import ops

    last = layers[-1]
    handles = []

    def make_hook(li: int, layer: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            batch: _Batch = current["batch"]
            hidden = block_input(args, kwargs)  # [B, T, d]
            dev = hidden.device
            x = hidden.index_select(1, batch.gather_index(hidden.shape[1], dev))  # [B, P, d]
            acc, sm = state.buffers(li, dev)
            ops.group_accumulate_(acc, x.reshape(-1, x.shape[-1]), batch.index(dev), deterministic=deterministic)
            if sm is not None:
                xf = x.float()
                for g in batch.group_rows:
                    rows = batch.rows(g, dev)
                    xg = (xf if rows is None else xf.index_select(0, rows)).transpose(0, 1)  # [P, n, d]
                    sm[g].add_(torch.matmul(xg.transpose(1, 2), xg).to(sm.device))  # [P, d, d]
            if layer == last:
                raise _StopForward
            return None

        return hook

    try:
        for li, layer in enumerate(layers):
            handles.append(adapter.blocks[layer].register_forward_pre_hook(make_hook(li, layer), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------- the plan
@dataclass
class _Plan:
    """Everything :func:`extract_means` decided before the first forward pass."""

    adapter: ModelAdapter
    names: list[str]
    prompt_lists: list[list[str]]
    flat: list[str]                # all prompts, group after group
    row_group: list[int]           # group index of each prompt in ``flat``
    lengths: list[int]             # formatted token count of each prompt in ``flat``
    layers: list[int]
    positions: list[int]
    sm_layers: list[int]
    batch_size: int
    system_prompt: str | None
    deterministic: bool
    rank: int
    world: int
    batches: list[list[int]]       # this rank's batches (indices into ``flat``)
    meta: dict[str, Any]
    run_fingerprint: str           # hash of every argument that changes the result
    checkpoint: Path | None
    checkpoint_every: int

    @property
    def n_prompts(self) -> int:
        return sum(len(b) for b in self.batches)

    def new_state(self) -> _State:
        slots = {self.layers.index(l): i for i, l in enumerate(self.sm_layers)}
        return _State(len(self.layers), len(self.names), len(self.positions), self.adapter.d_model, slots)

    def means(self, sums: torch.Tensor, counts: list[int], second: dict, extra: dict | None = None) -> Means:
        meta = dict(self.meta, **(extra or {}))
        return Means(sums, counts, self.names, self.layers, self.positions, meta, second)


def _check_arguments(model, tokenizer, groups, positions, layers, batch_size, system_prompt, second_moment_layers,
                     checkpoint, checkpoint_every) -> dict[str, Any]:
    """Validate the arguments (cheap checks first; the checkpoint directory is probed before any compute)."""
    names, prompt_lists = _check_groups(groups)
    batch_size = _check_int(batch_size, "batch_size")
    every = DEFAULT_CHECKPOINT_EVERY if checkpoint_every is None else _check_int(checkpoint_every, "checkpoint_every")
    ckpt = None
    if checkpoint is not None:
        ckpt = Path(checkpoint).expanduser()
        if ckpt.is_dir():
            raise ArtifactError(f"checkpoint must be a file path, but {ckpt} is a directory "
                                f"(e.g. pass {ckpt / 'means.ckpt.safetensors'})")
        check_writable(ckpt.parent, "checkpoint directory")
    adapter = get_adapter(model)
    layer_list = adapter.check_layers(layers, "layers")
    sm_layers: list[int] = []
    if second_moment_layers is not None:
        sm_layers = adapter.check_layers(second_moment_layers, "second_moment_layers")
        extra = sorted(set(sm_layers) - set(layer_list))
        if extra:
            raise ValueError(f"second_moment_layers {extra} are not among the extracted layers {layer_list}")
    eoi = chat.eoi_tokens(tokenizer, system_prompt)
    pos_list = _check_positions(positions, list(range(-len(eoi), 0)))
    return dict(adapter=adapter, names=names, prompt_lists=prompt_lists, batch_size=batch_size, every=every,
                checkpoint=ckpt, layers=layer_list, sm_layers=sm_layers, eoi=eoi, positions=pos_list)


def _check_prompts_fit(model, flat: list[str], row_group: list[int], names: list[str], lengths: list[int],
                       positions: list[int], n_eoi: int) -> None:
    """Every position must lie inside the shortest prompt; no prompt may exceed the model's positions."""
    chat.check_prompt_lengths(model, lengths, flat)
    shortest = min(lengths)
    if -positions[0] > shortest:
        i = lengths.index(shortest)
        raise ValueError(
            f"position {positions[0]} lies before the start of the shortest prompt ({shortest} tokens: "
            f"group {names[row_group[i]]!r}, prompt {flat[i][:60]!r}); positions must be within "
            f"[-{shortest}, -1] (end-of-instruction positions are {list(range(-n_eoi, 0))})"
        )


def _metadata(adapter: ModelAdapter, tokenizer, eoi: list[int], system_prompt: str | None, names: list[str],
              prompt_lists: list[list[str]], deterministic: bool) -> dict[str, Any]:
    """Provenance stored with the means (the model's identity includes its weights fingerprint)."""
    return {
        "library_version": library_version(),
        "model": model_identity(adapter.model),
        "template": {
            "sha256": chat.template_fingerprint(tokenizer, system_prompt),
            "eoi_tokens": [int(t) for t in eoi],
            "tokenizer": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        },
        "system_prompt": system_prompt,
        "prompt_sets": {n: prompt_set_hash(ps) for n, ps in zip(names, prompt_lists)},
        "prompt_set_hash": "sum of sha256(prompt) mod 2^256 (order-independent, additive under merge)",
        "accumulate_dtype": "float32 partials per batch, float64 totals",
        "deterministic": bool(deterministic),
    }


def _plan(model, tokenizer, groups, positions, layers, batch_size, system_prompt, deterministic,
          second_moment_layers, checkpoint, checkpoint_every, distributed) -> _Plan:
    """Validate, tokenize, bucket and describe the extraction (no forward pass yet)."""
    a = _check_arguments(model, tokenizer, groups, positions, layers, batch_size, system_prompt, second_moment_layers,
                         checkpoint, checkpoint_every)
    names, prompt_lists, adapter = a["names"], a["prompt_lists"], a["adapter"]
    flat = [p for ps in prompt_lists for p in ps]
    row_group = [g for g, ps in enumerate(prompt_lists) for _ in ps]
    lengths = chat.prompt_lengths(tokenizer, flat, system_prompt)
    _check_prompts_fit(model, flat, row_group, names, lengths, a["positions"], len(a["eoi"]))
    if adapter.model.training:
        warnings.warn("model is in training mode (dropout active); call model.eval() for reproducible means",
                      stacklevel=3)
    rank, world = _dist_info(distributed)
    meta = _metadata(adapter, tokenizer, a["eoi"], system_prompt, names, prompt_lists, deterministic)
    run_fingerprint = hashlib.sha256(json.dumps({
        "prompts": {n: _ordered_hash(ps) for n, ps in zip(names, prompt_lists)}, "names": names,
        "positions": a["positions"], "layers": a["layers"], "second_moment_layers": a["sm_layers"],
        "batch_size": a["batch_size"], "system_prompt": system_prompt, "model": meta["model"]["config_hash"],
        "weights": meta["model"]["weights_fingerprint"], "template": meta["template"]["sha256"],
        "deterministic": bool(deterministic), "world": world,
    }, sort_keys=True).encode()).hexdigest()
    if world > 1:
        _check_same_args(run_fingerprint)
    ckpt = _rank_path(a["checkpoint"], rank, world) if a["checkpoint"] is not None else None
    return _Plan(adapter=adapter, names=names, prompt_lists=prompt_lists, flat=flat, row_group=row_group,
                 lengths=lengths, layers=a["layers"], positions=a["positions"], sm_layers=a["sm_layers"],
                 batch_size=a["batch_size"], system_prompt=system_prompt, deterministic=bool(deterministic),
                 rank=rank, world=world, batches=chat.length_buckets(lengths, a["batch_size"])[rank::world],
                 meta=meta, run_fingerprint=run_fingerprint, checkpoint=ckpt, checkpoint_every=a["every"])


# ---------------------------------------------------------------------------- checkpoints
def _rank_path(path: Path, rank: int, world: int) -> Path:
    if world == 1:
        return path
    return path.with_name(f"{path.stem}.rank{rank}-of-{world}{path.suffix}")


def _save_checkpoint(plan: _Plan, state: _State) -> None:
    info = {"fingerprint": plan.run_fingerprint, "rank": plan.rank, "world": plan.world,
            "n_batches": len(plan.batches), "batches_done": state.batches_done}
    assert plan.checkpoint is not None
    plan.means(state.sums(), state.counts, state.second_moments(plan.sm_layers), {"checkpoint": info}).save(
        plan.checkpoint, sidecar=False)


def _resume(plan: _Plan, state: _State) -> int:
    """Load ``plan.checkpoint`` into ``state`` if it exists; returns the number of batches it holds."""
    path = plan.checkpoint
    if path is None or not path.exists():
        return 0
    saved = Means.load(path, allow_partial=True)
    check_identity(saved.metadata.get("model"), plan.meta["model"],
                   what=f"checkpoint {path} was written by an extraction from",
                   hint="delete it or pass another checkpoint path")
    info = saved.metadata.get("checkpoint") or {}
    if info.get("fingerprint") != plan.run_fingerprint:
        raise ValueError(
            f"checkpoint {path} was written by an extraction with different arguments (prompts, layers, "
            "positions, batch size, model, template or world size); delete it or pass another checkpoint path"
        )
    done = int(info.get("batches_done", -1))
    if not 0 <= done <= len(plan.batches):
        raise ArtifactError(f"checkpoint {path} is corrupt: batches_done={done} of {len(plan.batches)}; delete it")
    state.load(saved, plan.sm_layers)
    state.batches_done = done
    return done


# ---------------------------------------------------------------------------- distributed
def _all_reduce(state: _State, sm_layers: Sequence[int]) -> tuple:
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    sums = state.sums()
    flat = torch.cat([sums.reshape(-1), torch.tensor(state.counts, dtype=torch.float64)]).to(device)
    dist.all_reduce(flat)
    flat = flat.cpu()
    n = sums.numel()
    sums = flat[:n].view_as(sums).clone()
    counts = [int(round(c)) for c in flat[n:].tolist()]
    second = {}
    for layer, t in state.second_moments(sm_layers).items():
        t = t.to(device)
        dist.all_reduce(t)
        second[layer] = t.cpu()
    return sums, counts, second


def _check_same_args(fingerprint: str) -> None:
    """Raise on every rank if the ranks were called with different arguments."""
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    h = int(fingerprint[:15], 16)
    lo = torch.tensor([h], dtype=torch.int64, device=device)
    hi = lo.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if lo.item() != hi.item():
        raise ValueError("torch.distributed ranks called extract_means with different prompts or arguments")


# ---------------------------------------------------------------------------- the batch loop
def _forward(plan: _Plan, tokenizer, current: dict, idx: list[int]) -> int:
    """One forward pass over prompts ``idx``, stopped after the last needed block; returns its padded width."""
    adapter = plan.adapter
    enc = chat.encode_prompts(tokenizer, [plan.flat[i] for i in idx], plan.system_prompt, device=adapter.device)
    current["batch"] = _Batch([plan.row_group[i] for i in idx], len(plan.positions), plan.positions)
    try:
        adapter.base_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                           position_ids=enc["position_ids"], use_cache=False)
    except _StopForward:
        return int(enc["input_ids"].shape[1])
    raise RuntimeError(
        f"the forward pass finished without reaching block {plan.layers[-1]}; "
        "the extraction hooks did not fire (is the model wrapped or compiled?)"
    )


def _run_batches(plan: _Plan, state: _State, tokenizer, progress: bool) -> dict[str, float]:
    """Accumulate every remaining batch into ``state``, checkpointing as asked; returns token counts and time."""
    done_prompts = sum(len(b) for b in plan.batches[:state.batches_done])
    last_saved = state.batches_done
    tokens = padded = 0
    current: dict[str, Any] = {}
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=plan.n_prompts, initial=done_prompts, unit="prompt", desc="extract_means",
                   disable=plan.rank != 0)
    folding = False
    try:
        with torch.inference_mode(), _capture(plan.adapter, plan.layers, state, current, plan.deterministic):
            for bi in range(state.batches_done, len(plan.batches)):
                idx = plan.batches[bi]
                state.zero_partials()
                width = _forward(plan, tokenizer, current, idx)
                folding = True  # a half-folded state must never be checkpointed
                state.fold()
                for i in idx:
                    state.counts[plan.row_group[i]] += 1
                state.batches_done = bi + 1
                folding = False
                tokens += int(sum(plan.lengths[i] for i in idx))
                padded += len(idx) * width
                if bar is not None:
                    bar.update(len(idx))
                if plan.checkpoint is not None and state.batches_done - last_saved >= plan.checkpoint_every:
                    _save_checkpoint(plan, state)
                    last_saved = state.batches_done
                if _after_batch is not None:
                    _after_batch(state.batches_done)
    except BaseException:
        if plan.checkpoint is not None and not folding and state.batches_done > last_saved:
            _save_checkpoint(plan, state)
        raise
    finally:
        if bar is not None:
            bar.close()
    if plan.checkpoint is not None and state.batches_done > last_saved:
        _save_checkpoint(plan, state)
    return {"tokens": tokens, "padded": padded, "seconds": time.perf_counter() - t0, "done_prompts": done_prompts}


def _result(plan: _Plan, state: _State, run: dict[str, float], resumed: int) -> Means:
    """The finished :class:`Means` (all-reduced over ranks) with its run statistics."""
    state_bytes = state.nbytes()
    if plan.world > 1:
        sums, counts, second = _all_reduce(state, plan.sm_layers)
    else:
        sums, counts, second = state.sums(), list(state.counts), state.second_moments(plan.sm_layers)
    means = plan.means(sums, counts, second)
    seconds, tokens, padded = run["seconds"], int(run["tokens"]), int(run["padded"])
    n_run = plan.n_prompts - int(run["done_prompts"])
    means.stats = {
        "n_batches": len(plan.batches), "resumed_batches": resumed, "n_prompts": plan.n_prompts, "rank": plan.rank,
        "world": plan.world, "seconds": seconds, "prompts_per_s": n_run / seconds if seconds > 0 else math.inf,
        "tokens": tokens, "padded_tokens": padded, "padding_fraction": 1 - tokens / padded if padded else 0.0,
        "accumulator_nbytes": state_bytes,
    }
    return means


# ---------------------------------------------------------------------------- main entry
def extract_means(
    model,
    tokenizer,
    groups: Mapping[str, Sequence[str]],
    positions: Sequence[int] | int | None = None,
    layers: Sequence[int] | int | None = None,
    batch_size: int = 32,
    system_prompt: str | None = None,
    deterministic: bool = False,
    progress: bool = True,
    second_moment_layers: Sequence[int] | int | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    distributed: bool | None = None,
) -> Means:
    """Mean residual-stream activation per prompt group, per layer and end-of-instruction position.

    Args:
        model: a transformers causal LM supported by :func:`refusal_fast.models.get_adapter`.
        tokenizer: its tokenizer, with a chat template (not changed: padding is done here).
        groups: ``{name: [instruction, ...]}``; any number of non-empty groups.
        positions: negative token offsets from the end of the formatted prompt; default the
            end-of-instruction positions :func:`refusal_fast.chat.eoi_positions`.
        layers: layer indices (layer ``l`` = residual at the input of block ``l`` =
            ``hidden_states[l]``; negatives count from the end); default all.
        batch_size: prompts per forward pass (batches are length-sorted across all groups).
        system_prompt: optional system prompt rendered into every prompt.
        deterministic: bit-reproducible accumulation (fixed reduction order, no atomics).
        progress: show a tqdm bar (prompts/s).
        second_moment_layers: layers (a subset of ``layers``) at which to also accumulate
            ``sum x xᵀ`` ``[n_groups, n_positions, d_model, d_model]`` (see :meth:`Means.covariance`).
        checkpoint: path of a resumable partial state; written every ``checkpoint_every``
            batches (default 50), on interruption and at the end. Rerunning with the same
            arguments resumes from it and gives the same result as one uninterrupted run; a
            checkpoint of another model (weights fingerprint) or other arguments is refused.
            Its directory is created and probed for writing before any compute.
            Under ``torch.distributed`` each rank writes ``<stem>.rank<r>-of-<w><suffix>``.
        distributed: shard prompts over ``torch.distributed`` ranks and all-reduce the sums;
            default: if a process group is initialised.

    Returns:
        :class:`Means` with ``mean(group)`` ``[n_layers, n_positions, d_model]`` float64; its
        metadata records the model's identity (config hash and weights fingerprint).

    Raises:
        TypeError / ValueError: bad groups, prompts, positions, layers or arguments, a prompt longer
            than a learned position table, a meta-device model, an unwritable checkpoint directory.
    """
    plan = _plan(model, tokenizer, groups, positions, layers, batch_size, system_prompt, deterministic,
                 second_moment_layers, checkpoint, checkpoint_every, distributed)
    state = plan.new_state()
    resumed = _resume(plan, state)
    run = _run_batches(plan, state, tokenizer, progress)
    return _result(plan, state, run, resumed)
