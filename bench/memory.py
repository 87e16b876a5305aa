"""Per-rank memory of every hybrid layout, measured beside the planner's prediction; the largest trainable model.

Run (one benchmark at a time; the machine's cores are shared)::

    nice -n 10 .venv/bin/python bench/memory.py layouts            # the ~100M Llama on 1, 2 and 4 ranks
    nice -n 10 .venv/bin/python bench/memory.py largest            # the largest model that trains 3 steps
    .venv/bin/python bench/memory.py tables                        # print the markdown tables from the JSON

Results go to ``bench/results/memory.json`` (each run updates its own rows). Nothing is asserted: the
PASS/FAIL column is part of the table.

**Layouts** (part ``layouts``): a Llama config (vocab 32000, hidden 768, intermediate 2048, 10 layers, 12 heads /
4 KV heads, untied, 112.1M parameters), fp32, AdamW, micro-batch 2 x 128 tokens per data-parallel rank (split into
2 pipeline microbatches under pp), 3 steps, built under ``trainer.init_module(empty_init=True)`` (meta device).
Each rank is a spawned process (gloo) and measures itself:

* **train state**: bytes of ``p.to_local()`` (a DTensor's shard, else ``p``), of ``p.grad``, and of every tensor in
  ``optimizer.state`` at ``on_train_batch_end`` of the last step; gradients are taken as the larger of that and
  their bytes at ``on_before_optimizer_step`` (zero_stage 1 drops the gradients other ranks own inside the step,
  after they were all held). **Replicated**: parameters not divided by the layout's full factor
  (``local numel * tp * dp_shard > numel``: norms under tp), listed with their train-state bytes.
* **check**: train state <= 1.05 x what the layout divides + the replicated tensors' train state: parameters and
  gradients (8 bytes per parameter) / (tp * pp), and / dp_shard from zero_stage 2; AdamW's two states (8 bytes)
  / (tp * pp * dp_shard) from zero_stage 1. For zero_stage 0, 2 and 3 this is full / (tp * pp * dp_shard) with
  dp_shard = 1 at zero 0; zero_stage 1 by design keeps whole parameters and gradients.
* **activations**: bytes autograd keeps for backward, from ``torch.autograd.graph.saved_tensors_hooks`` around
  step 2: every saved tensor that is not a parameter (nor a view of one) is counted once per storage while its
  graph node holds it, and the peak of that live sum is reported (under 1F1B it falls as microbatches finish
  backward). Checkpointed blocks save nothing through these hooks (torch's checkpoint installs its own); their
  inputs, which the checkpoint keeps, are added (a forward pre-hook per block), plus one block's activations
  for the recompute in backward, taken from the largest block of the same layout without checkpointing.
* **RSS**: ``ru_maxrss`` minus the resident set right before the module is built (the empty-process baseline:
  interpreter, torch, Lightning, transformers), at ``on_train_start`` (setup: build, split, shard, materialize)
  and after the last step. The layout ``tp2_pp2_no_empty_init`` builds the same model without ``empty_init``
  (every rank allocates and initializes the full model first) to show the spike meta-device init avoids.

The planner's figures are ``lit_parallel.plan.estimate_memory`` for the same config and layout (worst rank);
they are compared with the largest measured rank of that stage.

**Largest model** (part ``largest``): Llama shapes of growing size (vocab 32000, untied, fp32, AdamW, 1 x 64
tokens), trained 3 steps as one process (``zero_stage=0``) and as 4 ranks with ``zero_stage=3`` and
``activation_checkpointing="full"``, each run capped in time (``--timeout``) and in memory: a watchdog kills the
run when the ranks' summed RSS exceeds ``--memory-cap`` or the machine has less than 3 GiB available (it is
shared, so the kernel's OOM killer is not left to choose a process). The search per mode stops at the first size that fails.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "results" / "memory.json"
MiB = 2**20

CONFIG = {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 10,
          "num_attention_heads": 12, "num_key_value_heads": 4, "tie_word_embeddings": False,
          "max_position_embeddings": 512}
MICRO_BATCH, SEQ_LEN, STEPS = 2, 128, 3

# name -> (tp, pp, dp, zero_stage, dp_shard, activation_checkpointing, empty_init)
LAYOUTS: dict[str, tuple[int, int, int, int, int | str, str, bool]] = {
    "single": (1, 1, 1, 0, "auto", "none", True),
    "dp2_zero0": (1, 1, 2, 0, "auto", "none", True),
    "dp2_zero1": (1, 1, 2, 1, "auto", "none", True),
    "dp2_zero2": (1, 1, 2, 2, "auto", "none", True),
    "dp2_zero3": (1, 1, 2, 3, "auto", "none", True),
    "tp2": (2, 1, 1, 0, "auto", "none", True),
    "pp2": (1, 2, 1, 0, "auto", "none", True),
    "dp4_zero0": (1, 1, 4, 0, "auto", "none", True),
    "dp4_zero1": (1, 1, 4, 1, "auto", "none", True),
    "dp4_zero2": (1, 1, 4, 2, "auto", "none", True),
    "dp4_zero3": (1, 1, 4, 3, "auto", "none", True),
    "dp4_zero3_ac_full": (1, 1, 4, 3, "auto", "full", True),
    "tp2_pp2": (2, 2, 1, 0, "auto", "none", True),
    "tp2_dp_shard2_zero3": (2, 1, 2, 3, "auto", "none", True),
    "pp2_dp_shard2_zero3": (1, 2, 2, 3, "auto", "none", True),
    "dp_replicate2_dp_shard2_zero3": (1, 1, 4, 3, 2, "none", True),
    "tp2_pp2_no_empty_init": (2, 2, 1, 0, "auto", "none", False),
}
# an activation-checkpointed layout -> the same per-rank shapes without checkpointing (its largest block)
RECOMPUTE_FROM = {"dp4_zero3_ac_full": "dp4_zero3"}

# Llama shapes for the largest-model search: name -> (hidden, intermediate, layers, heads, kv heads)
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "0.5B": (1536, 4096, 14, 12, 4),
    "0.75B": (1792, 4864, 17, 14, 2),
    "1B": (2048, 5632, 18, 16, 4),
    "1.25B": (2048, 5632, 24, 16, 4),
    "1.5B": (2304, 6144, 22, 18, 6),
    "2B": (2560, 6912, 23, 20, 4),
    "3B": (3072, 8192, 25, 24, 8),
}


def _rss() -> int:
    """Current resident set of this process, bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    """Peak resident set of this process so far, bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _llama_config(**overrides: Any):
    from transformers import LlamaConfig

    return LlamaConfig(**{**CONFIG, **overrides})


def _size_config(name: str):
    h, inter, layers, heads, kv = SIZES[name]
    return _llama_config(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, max_position_embeddings=128)


# ---------------------------------------------------------------------------------------------------------------
# Saved-tensor accounting
# ---------------------------------------------------------------------------------------------------------------
class _Held:
    """What the pack hook returns: the saved tensor, counted while autograd holds this object."""

    __slots__ = ("owner", "ptr", "tensor")

    def __init__(self, owner: _SavedBytes, tensor: Any, ptr: int) -> None:
        self.owner, self.tensor, self.ptr = owner, tensor, ptr

    def __del__(self) -> None:
        self.owner._release(self.ptr)


class _SavedBytes:
    """Live bytes of the non-parameter tensors autograd saves, counted once per storage; and their peak."""

    def __init__(self, parameters: list[Any]) -> None:
        self.param_ptrs = {_local(p).untyped_storage().data_ptr() for p in parameters}
        self.refs: dict[int, list[int]] = {}  # storage ptr -> [references, bytes]
        self.live = self.peak = 0
        self.block: str | None = None
        self.block_bytes: dict[str, int] = {}
        self.inputs: list[_Held] = []  # checkpointed blocks' inputs, held until the step ends
        self._ctx: Any = None

    def pack(self, tensor: Any) -> Any:
        root = tensor._base if tensor._base is not None else tensor
        if root.is_leaf and root.requires_grad:
            return tensor  # a parameter (or FSDP2's unsharded parameter), or a view of one
        return self._hold(tensor) or tensor

    def _hold(self, tensor: Any) -> _Held | None:
        storage = _local(tensor).untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0 or ptr in self.param_ptrs:
            return None
        entry = self.refs.setdefault(ptr, [0, storage.nbytes()])
        if entry[0] == 0:
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
            if self.block is not None:
                self.block_bytes[self.block] = self.block_bytes.get(self.block, 0) + entry[1]
        entry[0] += 1
        return _Held(self, tensor, ptr)

    @staticmethod
    def unpack(held: Any) -> Any:
        return held.tensor if isinstance(held, _Held) else held

    def _release(self, ptr: int) -> None:
        entry = self.refs[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.refs[ptr]

    def keep_input(self, tensor: Any) -> None:
        held = self._hold(tensor)
        if held is not None:
            self.inputs.append(held)

    def __enter__(self) -> _SavedBytes:
        import torch

        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)
        self.inputs.clear()


def _local(tensor: Any) -> Any:
    local = getattr(tensor, "_local_tensor", None)  # a DTensor's shard (no autograd op, unlike to_local())
    return local if local is not None else tensor


def _nbytes(tensor: Any) -> int:
    t = _local(tensor)
    return t.numel() * t.element_size()


# ---------------------------------------------------------------------------------------------------------------
# One rank of one layout
# ---------------------------------------------------------------------------------------------------------------
def _probe_class():
    import lightning as L

    class _Probe(L.Callback):
        """Measures this rank: RSS at setup and after the steps, saved tensors in step 2, train state at the end."""

        def __init__(self, baseline: int, checkpointed: bool) -> None:
            self.baseline, self.checkpointed = baseline, checkpointed
            self.out: dict[str, Any] = {"baseline_rss": baseline}
            self.saved: _SavedBytes | None = None
            self.grad_peak = 0
            self._hooks: list[Any] = []

        def on_train_start(self, trainer, pl_module) -> None:
            self.out["setup_peak_rss"] = _peak() - self.baseline
            self.out["setup_rss"] = _rss() - self.baseline
            self.out["materialized_bytes"] = getattr(trainer.strategy, "materialized_bytes", None)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx != 1:
                return
            self.out["step_start_rss"] = _rss() - self.baseline
            self.saved = _SavedBytes(list(pl_module.parameters()))
            for name, block in _decoder_layers(pl_module):
                self._hooks.append(block.register_forward_pre_hook(self._enter_block(name), with_kwargs=True))
                self._hooks.append(block.register_forward_hook(self._leave_block))
            self.saved.__enter__()

        def _enter_block(self, name: str):
            def hook(module, args, kwargs) -> None:
                assert self.saved is not None
                self.saved.block = name
                if self.checkpointed and args:
                    self.saved.keep_input(args[0])
                elif self.checkpointed and "hidden_states" in kwargs:
                    self.saved.keep_input(kwargs["hidden_states"])
            return hook

        def _leave_block(self, module, args, output) -> None:
            assert self.saved is not None
            self.saved.block = None

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            self.grad_peak = max(self.grad_peak, sum(_nbytes(p.grad) for p in pl_module.parameters()
                                                     if p.grad is not None))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx == 1 and self.saved is not None:
                self.saved.__exit__(None, None, None)
                for handle in self._hooks:
                    handle.remove()
                self._hooks = []
                self.out["saved_peak"] = self.saved.peak
                self.out["saved_block_max"] = max(self.saved.block_bytes.values(), default=0)
                self.out["step2_peak_rss"] = _peak() - self.baseline
            if batch_idx == trainer.max_steps - 1:
                self._train_state(trainer, pl_module)
                self.out["final_peak_rss"] = _peak() - self.baseline

        def _train_state(self, trainer, pl_module) -> None:
            params = list(pl_module.named_parameters())
            self.out["params"] = sum(_nbytes(p) for _, p in params)
            self.out["grads"] = sum(_nbytes(p.grad) for _, p in params if p.grad is not None)
            self.out["grads_before_step"] = self.grad_peak
            optim = 0
            for optimizer in trainer.optimizers:
                for state in optimizer.state.values():
                    optim += sum(_nbytes(v) for v in state.values() if hasattr(v, "untyped_storage"))
            self.out["optimizer"] = optim
            self.out["numel"] = {n: [_local(p).numel(), p.numel()] for n, p in params}
            held = {id(p): sum(_nbytes(v) for v in s.values() if hasattr(v, "untyped_storage"))
                    for optimizer in trainer.optimizers for p, s in optimizer.state.items()}
            self.out["state_of"] = {n: _nbytes(p) + (_nbytes(p.grad) if p.grad is not None else 0) + held.get(id(p), 0)
                                    for n, p in params}

    return _Probe


def _decoder_layers(pl_module) -> list[tuple[str, Any]]:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return [(n, m) for n, m in pl_module.named_modules() if isinstance(m, LlamaDecoderLayer)]


def _token_loader(vocab: int, seq: int, micro: int, dp: int, steps: int):
    import torch
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (steps * micro * dp, seq), generator=g)
    data = [{"input_ids": ids[i], "attention_mask": torch.ones(seq, dtype=torch.long), "labels": ids[i]}
            for i in range(len(ids))]
    return DataLoader(data, batch_size=micro, shuffle=False)


def _run_rank(config_kwargs: dict[str, Any], layout: tuple, micro: int, seq: int, steps: int, measure: bool) -> dict:
    """Body of one rank: build under init_module, fit ``steps`` steps, return this rank's measurements."""
    import lightning as L
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("WORLD_SIZE", "1"))))
    from transformers import LlamaForCausalLM

    from lit_parallel import HybridParallelStrategy
    from lit_parallel.models import CausalLM

    tp, pp, dp, zero, shard, ac, empty_init = layout
    config = _llama_config(**config_kwargs)
    L.seed_everything(0, verbose=False)
    strategy = HybridParallelStrategy(tensor_parallel_size=tp, pipeline_parallel_size=pp, data_parallel_size=dp,
                                      zero_stage=zero, data_parallel_shard_size=shard, activation_checkpointing=ac,
                                      num_microbatches=2 if pp > 1 else "auto")
    probe = _probe_class()(_rss(), checkpointed=ac != "none") if measure else None
    trainer = L.Trainer(accelerator="cpu", devices=tp * pp * dp, strategy=strategy, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[probe] if probe is not None else [])
    baseline = _rss()
    if probe is not None:
        probe.baseline = probe.out["baseline_rss"] = baseline
    t0 = time.perf_counter()
    with trainer.init_module(empty_init=empty_init):
        module = CausalLM(LlamaForCausalLM(config), lr=1e-4)
    trainer.fit(module, _token_loader(config.vocab_size, seq, micro, dp, steps))
    out = probe.out if probe is not None else {}
    out.update(rank=trainer.global_rank, seconds=time.perf_counter() - t0, peak_rss=_peak() - baseline,
               baseline_rss=baseline)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Layouts: measured vs predicted
# ---------------------------------------------------------------------------------------------------------------
def _prediction(layout: tuple, config_kwargs: dict[str, Any], micro: int, seq: int) -> Any:
    from lit_parallel.plan import Layout, estimate_memory

    tp, pp, dp, zero, shard, ac, _ = layout
    return estimate_memory(_llama_config(**config_kwargs), Layout(tp, pp, dp, zero, None if shard == "auto" else shard, ac),
                           batch_size=micro, seq_len=seq, precision="32-true", optimizer="adamw",
                           num_microbatches=2 if pp > 1 else None)


def _replicated(rank: dict, factor: int) -> dict[str, int]:
    """Parameters this rank holds more of than ``numel / factor``: name pattern -> their train-state bytes here."""
    found: dict[str, int] = {}
    for name, (local, full) in rank["numel"].items():
        if local and local * factor > full:
            key = ".".join("*" if part.isdigit() else part for part in name.split("."))
            found[key] = found.get(key, 0) + rank["state_of"][name]
    return found


def measure_layout(name: str, timeout: float) -> dict[str, Any]:
    from lit_parallel.testing import DistributedRunError, run_distributed

    layout = LAYOUTS[name]
    tp, pp, dp, zero, shard, ac, empty_init = layout
    world = tp * pp * dp
    row: dict[str, Any] = {"layout": name, "tp": tp, "pp": pp, "dp": dp, "zero_stage": zero, "dp_shard": shard,
                           "activation_checkpointing": ac, "empty_init": empty_init, "world_size": world}
    t0 = time.perf_counter()
    try:
        row["ranks"] = run_distributed(_run_rank, world_size=world,
                                       args=({}, layout, MICRO_BATCH, SEQ_LEN, STEPS, True),
                                       init_process_group=False, timeout=timeout, collective_timeout=timeout)
    except DistributedRunError as err:
        lines = str(err).strip().splitlines()
        row["error"] = lines[-1][:300]
        row["error_head"] = "\n".join(lines[:40])
    row["seconds"] = time.perf_counter() - t0
    return row


def _finish(rows: dict[str, dict]) -> None:
    """Predictions (the current planner), per-rank train state, replicated tensors, the bound and its check, and
    measured activations (saved peak, + one block's recompute from the layout without checkpointing)."""
    from lit_parallel.plan import model_shape

    for name, row in rows.items():
        layout = LAYOUTS[name]
        tp, pp, _, zero, _, ac, _ = layout
        est = _prediction(layout, {}, MICRO_BATCH, SEQ_LEN)
        row["dp_shard"] = shard = est.layout.shard
        row["predicted"] = {"parameters": est.parameters, "gradients": est.gradients, "optimizer": est.optimizer,
                            "train_state": est.train_state, "activations": est.activations,
                            "transient": est.transient, "total": est.total, "stage": est.stage}
        if "ranks" not in row:
            continue
        numel = model_shape(_llama_config()).num_parameters  # the whole model (a pipeline rank holds one stage)
        # What the layout divides: parameters and gradients by tp*pp (and by dp_shard from zero 2), AdamW's two
        # states by tp*pp*dp_shard from zero 1. For zero 2 and 3 this is full / (tp*pp*dp_shard).
        s_pg, s_opt = (shard if zero >= 2 else 1), (shard if zero >= 1 else 1)
        row["full_train_state"] = numel * 16
        expected = numel * 8 / (tp * pp * s_pg) + numel * 8 / (tp * pp * s_opt)
        source = rows.get(RECOMPUTE_FROM.get(name, ""), {}).get("ranks", [])
        recompute = max((r["saved_block_max"] for r in source), default=None)
        for r in row["ranks"]:
            r["grads_held"] = max(r["grads"], r["grads_before_step"])  # zero 1 drops others' gradients in the step
            r["train_state"] = r["params"] + r["grads_held"] + r["optimizer"]
            r["replicated"] = _replicated(r, tp * s_pg)
            r["bound"] = int(1.05 * expected + sum(r["replicated"].values()))
            r["check"] = "PASS" if r["train_state"] <= r["bound"] else "FAIL"
            if ac == "none":
                r["activations"] = r["saved_peak"]
            else:
                r["activations"] = None if recompute is None else r["saved_peak"] + recompute


def _rel(measured: float | None, predicted: float) -> str:
    if measured is None or not predicted:
        return "-"
    return f"{(predicted - measured) / measured * 100:+.1f} %"


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / MiB:.1f}"


def layout_table(rows: dict[str, dict]) -> str:
    _finish(rows)
    out = ["| layout | ranks | per-rank train state MiB (params + grads + optim) | predicted | Δ | bound | check | "
           "replicated (train state MiB) | activations MiB | predicted | Δ | peak RSS above baseline at setup / "
           "after 3 steps MiB | predicted total |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in LAYOUTS:
        row = rows.get(name)
        if row is None:
            continue
        p = row["predicted"]
        if "ranks" not in row:
            out.append(f"| {name} | {row['world_size']} | **error**: `{row['error']}` | {_mib(p['train_state'])} | "
                       "| | | | | | | | |")
            continue
        ranks = row["ranks"]
        # the planner predicts its worst stage; compare with the ranks of that stage (pp is the outer mesh axis)
        per_stage = row["world_size"] // row["pp"]
        stage = [r for i, r in enumerate(ranks) if i // per_stage == p["stage"]]
        worst = max(stage, key=lambda r: r["train_state"])
        states = " / ".join(f"{_mib(r['train_state'])}" for r in ranks)
        parts = f"{_mib(worst['params'])} + {_mib(worst['grads_held'])} + {_mib(worst['optimizer'])}"
        check = "PASS" if all(r["check"] == "PASS" for r in ranks) else "FAIL"
        rep: dict[str, int] = {}
        for r in ranks:
            for k, v in r["replicated"].items():
                rep[k] = max(rep.get(k, 0), v)
        rep_text = ", ".join(f"`{k}` {v / MiB:.2f}" for k, v in rep.items()) or "-"
        acts = [r["activations"] for r in stage if r["activations"] is not None]
        act = max(acts) if acts else None
        rss = " / ".join(f"{_mib(r['setup_peak_rss'])}→{_mib(r['final_peak_rss'])}" for r in ranks)
        label = name + ("" if row["empty_init"] else " (**no** empty_init)")
        out.append(f"| {label} | {row['world_size']} | {states} (worst {parts}) | {_mib(p['train_state'])} | "
                   f"{_rel(worst['train_state'], p['train_state'])} | {_mib(max(r['bound'] for r in ranks))} | {check} | "
                   f"{rep_text} | {_mib(act)} | {_mib(p['activations'])} | {_rel(act, p['activations'])} | {rss} | "
                   f"{_mib(p['total'])} |")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
# The largest model that trains
# ---------------------------------------------------------------------------------------------------------------
def _child_rss(pid: int) -> int:
    """Summed RSS of the descendants of ``pid`` (the spawned ranks and their helpers), bytes."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, stack = 0, list(children.get(pid, []))
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack.extend(children.get(p, []))
    return total


_RESERVE = 3 * 2**30  # stop a run before the machine (shared with other work) runs out of memory


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def _largest_worker(size: str, mode: str, timeout: float, conn: Any) -> None:
    """Runs in its own process group so the watchdog can kill every rank at once."""
    from lit_parallel.testing import run_distributed

    h, inter, layers, heads, kv = SIZES[size]
    overrides = {"hidden_size": h, "intermediate_size": inter, "num_hidden_layers": layers,
                 "num_attention_heads": heads, "num_key_value_heads": kv, "max_position_embeddings": 128}
    layout = (1, 1, 1, 0, "auto", "none", True) if mode == "single" else (1, 1, 4, 3, "auto", "full", True)
    try:
        if mode == "single":
            os.environ.setdefault("WORLD_SIZE", "1")
            result = [_run_rank(overrides, layout, 1, 64, STEPS, measure=False)]
        else:
            result = run_distributed(_run_rank, world_size=4, args=(overrides, layout, 1, 64, STEPS, False),
                                     init_process_group=False, timeout=timeout, collective_timeout=timeout)
        conn.send({"ok": True, "ranks": result})
    except BaseException as err:  # noqa: BLE001 - reported to the parent as text
        conn.send({"ok": False, "error": f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"})


def measure_largest(size: str, mode: str, timeout: float, cap: int) -> dict[str, Any]:
    import multiprocessing as mp

    from lit_parallel.plan import Layout, estimate_memory, model_shape

    config = _size_config(size)
    layout = Layout() if mode == "single" else Layout(dp=4, zero_stage=3, activation_checkpointing="full")
    est = estimate_memory(config, layout, batch_size=1, seq_len=64)
    row: dict[str, Any] = {"size": size, "mode": mode, "parameters": model_shape(config).num_parameters,
                           "shape": dict(zip(("hidden", "intermediate", "layers", "heads", "kv_heads"), SIZES[size],
                                             strict=True)),
                           "predicted_per_rank": est.total, "predicted_all_ranks": est.total * layout.world_size}
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_largest_worker, args=(size, mode, timeout, child))
    t0 = time.perf_counter()
    proc.start()
    peak_sum, reason = 0, None
    while proc.is_alive():
        peak_sum = max(peak_sum, _child_rss(os.getpid()))
        elapsed = time.perf_counter() - t0
        available = _mem_available()
        if peak_sum > cap:
            reason = f"killed: the ranks' summed RSS reached {peak_sum / 2**30:.1f} GiB (cap {cap / 2**30:.1f} GiB)"
        elif available < _RESERVE:
            reason = (f"killed at {peak_sum / 2**30:.1f} GiB summed RSS: the machine had {available / 2**30:.1f} GiB "
                      "left (other processes share it)")
        elif elapsed > timeout + 30:
            reason = f"did not finish {STEPS} steps in {elapsed:.0f} s"
        if reason:
            _kill_tree(proc.pid)
            break
        if parent.poll(0.5):
            break
    result = parent.recv() if parent.poll(5) else None
    proc.join(10)
    row["seconds"] = time.perf_counter() - t0
    row["peak_rss_sum_sampled"] = peak_sum
    if result is not None and result["ok"]:
        row["status"] = "ok"
        row["per_rank_peak_rss"] = [r["peak_rss"] for r in result["ranks"]]
        row["baseline_rss"] = [r["baseline_rss"] for r in result["ranks"]]
    else:
        row["status"] = reason or (result["error"] if result else f"failed (exit code {proc.exitcode})")
    return row


def _kill_tree(pid: int) -> None:
    import signal

    stack, seen = [pid], []
    while stack:  # collect the whole tree first, then kill (children re-parent once the parent dies)
        p = stack.pop()
        seen.append(p)
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == p:
                            stack.append(int(entry))
                except (OSError, IndexError, ValueError):
                    pass
    for p in seen:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def largest_table(rows: list[dict]) -> str:
    out = ["| mode | size | parameters | result | per-rank peak RSS above baseline GiB | sum over ranks (sampled) GiB | "
           "planner per rank GiB | time s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = " / ".join(f"{b / 2**30:.2f}" for b in r.get("per_rank_peak_rss", [])) or "-"
        out.append(f"| {'1 process, zero 0' if r['mode'] == 'single' else '4 ranks, zero 3 + AC full'} | {r['size']} | "
                   f"{r['parameters'] / 1e9:.2f}B | {r['status']} | {per} | {r['peak_rss_sum_sampled'] / 2**30:.2f} | "
                   f"{r['predicted_per_rank'] / 2**30:.2f} | {r['seconds']:.0f} |")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
def _load() -> dict[str, Any]:
    return json.loads(OUT.read_text()) if OUT.exists() else {}


def _save(results: dict[str, Any]) -> None:
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("part", choices=["layouts", "largest", "tables"])
    parser.add_argument("--only", nargs="*", help=f"layouts to run (default all): {list(LAYOUTS)}")
    parser.add_argument("--sizes", nargs="*", default=list(SIZES), help=f"sizes to try in order: {list(SIZES)}")
    parser.add_argument("--modes", nargs="*", default=["single", "zero3_ac"], choices=["single", "zero3_ac"])
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    parser.add_argument("--memory-cap", default="20GiB", help="largest: kill a run above this summed RSS")
    args = parser.parse_args()
    results = _load()
    if args.part == "layouts":
        rows = results.setdefault("layouts", {})
        results["layouts_setup"] = {"config": CONFIG, "micro_batch": MICRO_BATCH, "seq_len": SEQ_LEN, "steps": STEPS,
                                    "precision": "32-true", "optimizer": "adamw",
                                    "command": "nice -n 10 .venv/bin/python bench/memory.py layouts "
                                               + " ".join(f"--only {' '.join(args.only)}" if args.only else "")}
        for name in args.only or list(LAYOUTS):
            print(f"[memory] {name} ...", flush=True)
            rows[name] = measure_layout(name, args.timeout)
            print(f"[memory] {name}: {rows[name].get('error', 'ok')} "
                  f"({rows[name].get('seconds', 0):.0f} s)", flush=True)
            _save(results)
        print(layout_table(rows))
    elif args.part == "largest":
        from lit_parallel.plan import parse_bytes

        cap = parse_bytes(args.memory_cap)
        rows = results.setdefault("largest", [])
        for mode in args.modes:
            for size in args.sizes:
                print(f"[memory] largest {mode} {size} ...", flush=True)
                row = measure_largest(size, mode, args.timeout, cap)
                row["command"] = (f"nice -n 10 .venv/bin/python bench/memory.py largest --modes {mode} --sizes {size} "
                                  f"--timeout {args.timeout:.0f} --memory-cap {args.memory_cap}")
                rows[:] = [r for r in rows if (r["size"], r["mode"]) != (size, mode)] + [row]
                _save(results)
                print(f"[memory] largest {mode} {size}: {row['status']} ({row['seconds']:.0f} s)", flush=True)
                if row["status"] != "ok":
                    break
        print(largest_table(rows))
    else:
        if "layouts" in results:
            print(layout_table(results["layouts"]))
        if "largest" in results:
            print()
            print(largest_table(results["largest"]))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
