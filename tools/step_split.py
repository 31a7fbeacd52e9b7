"""Where a training step's time goes: forward, backward, optimizer, and per module kind
(attention, MoE router, MoE dispatch, experts, dense MLP, norms, embedding, output layer + loss,
MTP), each split into its forward and its backward time.

    with trainer_split(trainer) as split:          # our megatron Trainer
        report = split.measure(lambda: trainer.train_step(rows), steps=2)
    with model_split(hf_model, loss_module, optimizer) as split:   # a transformers model
        report = split.measure(step, steps=2)

tools/bench_train.py puts the report of each side in its JSON ("split"). The split is measured in
its own steps, after the timed ones: its hooks cost time, so the headline tokens/s never runs
with them; leaving the `with` removes every hook and wrapper it installed.

Which module is which kind is read from the model's structure, the same rules for megatron's
model and transformers' (so a class replaced behind the same attribute keeps its kind):
- attention: the module at a layer's `self_attention` (ours, MiMoAttention) or `self_attn`;
- an MoE block is a module with an `experts` submodule (megatron's MoELayer, transformers'
  MiMoV2FlashMoE): its `router` / `gate` is the MoE router, its `experts` the experts, and the
  block's own remaining time is the MoE dispatch (megatron: the token dispatcher's permute and
  unpermute; transformers: the block's glue around gate and experts);
- dense MLP: a layer's `mlp` that is not an MoE block;
- norms: any module whose class name ends in "Norm";
- embedding: the module at `embedding` (ours) or `embed_tokens`;
- output layer + loss: ours, the model's `_postprocess` (everything after the decoder: output
  layer, vocab-parallel cross-entropy, top-1 accuracy; the MTP block it calls is its own kind);
  transformers, `lm_head` plus the loss module the caller names (the bench's cross-entropy);
- MTP: the module at `mtp` (ours), whole: nothing called inside it (its attention, norms, MLPs,
  the shared embedding) is split out of it. The experts are whole in the same way.
Time is exclusive: while a kind runs inside another (a norm inside attention, the router inside
the MoE block), it counts for the inner one only. "other" is the step time that no kind holds:
the forward's and backward's glue (residual adds, the decoder loop, RoPE tables, the loss
reduction), and everything outside the two (optimizer, gradient finalisation, zeroing).

Mechanism, and why this one. Every event below reads one clock (time.perf_counter) and charges
the time since the previous event to the kind on top of a stack of open regions; that makes
the split exclusive by construction and makes the kinds add up to at most the step.
- Forward: forward pre/post hooks on the kind's modules (a wrapper for `_postprocess`, which
  is a method) open and close a region. Forward calls nest exactly.
- Backward: tensor gradient hooks, registered during the forward on each call's outputs (the
  first gradient to arrive at any of them opens the region) and on its inputs that need a
  gradient (the region closes when all of them have their gradient; so an input a region is
  given but does not differentiate through would hold it open: megatron passes _postprocess the
  embedding's output too, which is why a method region names its input). Tensor hooks were chosen
  over nn.Module's full backward hooks because those pass the inputs and outputs through an
  identity autograd Function, which our model does not survive (its train step then fails with
  "Output 0 of BackwardHookFunction is a view and its base ... has been modified inplace": a
  view of a hooked tensor is written in place downstream), and which sees neither a method nor
  a dataclass output (MiMoOutput). Tensor hooks change no tensor.
  A region whose inputs need no gradient (the embedding: token ids) has no input hook; it closes
  when the next region's backward starts or the pass ends, which for the embedding (the first
  module of the forward, so the last of the backward) is the end of the pass: its gradient's
  scatter and accumulation are its own. (Not the next event of any kind: the gradient hooks of
  the next module's input, the same tensor, fire in the same instant.)
  The intervals mean something because the CPU autograd engine runs the whole backward in the
  calling thread, picking ready nodes in reverse creation order, so a module's backward nodes
  run between its output's gradient and its input's.
- Backward passes: the first hook of a pass starts it and queues an engine callback
  (Variable._execution_engine.queue_callback) that ends it when the pass has finished, after
  the parameters' gradient accumulation.
- Phases outside the model (the optimizer step, our gradient finalisation) are timed by
  wrapping the callable the step calls (Trainer.update, the config's finalize_model_grads_func,
  torch's optimizer.step) for the duration of the `with`.
The hooks' own bookkeeping is timed and kept apart ("hooks_s"), so that neither the kinds nor
"other" include it; the step time of these steps still does, which is why it is reported next to
the hook-free one. On CUDA each event synchronises the device first (so a kernel's time lands on
the kind that launched it): the split then costs one device sync per event and its step time
is further from the hook-free one; the shares remain comparable, the absolute step time is
the timed pass's.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from collections.abc import Callable, Iterable, Iterator

import torch
from torch.autograd import Variable

KINDS = ("attention", "moe_router", "moe_dispatch", "experts", "dense_mlp", "norm", "embedding", "output_loss",
         "mtp")
# Kinds counted whole: what they call is not split out of them.
WHOLE = frozenset({"experts", "mtp"})
ATTENTION_ATTRS = ("self_attention", "self_attn")
ROUTER_ATTRS = ("router", "gate")
EMBEDDING_ATTRS = ("embedding", "embed_tokens")
OUTPUT_ATTRS = ("output_layer", "lm_head")
IDLE, OPEN, CLOSED = range(3)


class _Call:
    """One call of a region: on the stack while its forward runs, and again while its backward does."""

    __slots__ = ("kind", "leaf", "pending", "state")

    def __init__(self, kind: str | None):
        self.kind = kind
        self.state = IDLE  # of its backward
        self.pending = 0  # input gradients still to come
        self.leaf = False  # no input needs a gradient: its backward closes at the next one that starts


def tensors(obj, depth: int = 0) -> Iterator[torch.Tensor]:
    """The tensors in a module's arguments or output: tuples, lists, dicts (transformers'
    ModelOutput), dataclasses (MiMoOutput, PackedSeqParams)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth > 4:
        return
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from tensors(item, depth + 1)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from tensors(item, depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from tensors(getattr(obj, f.name, None), depth + 1)


def _child(module: torch.nn.Module, names: Iterable[str]) -> torch.nn.Module | None:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, torch.nn.Module):
            return child
    return None


def is_moe(module: torch.nn.Module) -> bool:
    return isinstance(getattr(module, "experts", None), torch.nn.Module)


def classify(roots: Iterable[torch.nn.Module]) -> dict[torch.nn.Module, str]:
    """Each module of a kind, by its position in the model (module docstring). Inside a kind
    counted whole (experts, MTP) nothing more is classified."""
    kinds: dict[torch.nn.Module, str] = {}

    def visit(module: torch.nn.Module) -> None:
        if kinds.get(module) in WHOLE:
            return
        for child in module.children():
            if type(child).__name__.endswith("Norm"):
                kinds.setdefault(child, "norm")
        positions = [(ATTENTION_ATTRS, "attention"), (EMBEDDING_ATTRS, "embedding"), (OUTPUT_ATTRS, "output_loss"),
                     (("mtp",), "mtp")]
        if is_moe(module):
            positions += [(ROUTER_ATTRS, "moe_router"), (("experts",), "experts")]
        for names, kind in positions:
            child = _child(module, names)
            if child is not None:
                kinds[child] = kind
        mlp = _child(module, ("mlp",))
        if mlp is not None:
            kinds[mlp] = "moe_dispatch" if is_moe(mlp) else "dense_mlp"
        for child in module.children():
            visit(child)

    for root in roots:
        visit(root)
    return kinds


class StepSplit:
    """A step's time split (module docstring). `roots`: the modules whose forward is the step's
    forward (the model, and for transformers the loss module); `extra`: modules of a kind the
    structure does not tell (transformers' loss module: output_loss); `methods`: (object, method
    name, kind, argument) regions that are methods, not modules (ours: the model's _postprocess),
    whose backward ends when that argument has its gradient;
    `phases`: name -> [(object, attribute)] callables whose time is that phase's; `clock`: wall
    time by default (time.thread_time, this thread's CPU time, leaves out what other processes
    take from it on a busy machine, where the backward runs in this thread: on the CPU)."""

    def __init__(self, roots: list[torch.nn.Module], *, extra: dict[torch.nn.Module, str] | None = None,
                 methods: list[tuple[object, str, str, str]] = (),
                 phases: dict[str, list[tuple[object, str]]] | None = None,
                 device: torch.device | str | None = None, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.roots = list(roots)
        self.kinds = {**classify(self.roots), **(extra or {})}
        self.methods = list(methods)
        self.phases = phases or {}
        self.cuda = torch.device(device).type == "cuda" if device is not None else False
        self._undo: list[Callable[[], None]] = []
        self._reset()

    # -- installing and removing --------------------------------------------------------------

    def __enter__(self) -> StepSplit:
        root_ids = {id(r) for r in self.roots}
        for module, kind in self.kinds.items():
            self._hook_module(module, kind, id(module) in root_ids)
        for root in self.roots:
            if root not in self.kinds:
                self._hook_module(root, None, True)
        for obj, name, kind, argument in self.methods:
            self._wrap(obj, name, self._region_method(kind, argument))
        for phase, targets in self.phases.items():
            for obj, name in targets:
                self._wrap(obj, name, self._phase_method(phase))
        return self

    def __exit__(self, *exc) -> None:
        while self._undo:
            self._undo.pop()()

    def _hook_module(self, module: torch.nn.Module, kind: str | None, root: bool) -> None:
        pre = module.register_forward_pre_hook(
            lambda m, args, kwargs: self._enter(kind, root, (args, kwargs)), with_kwargs=True, prepend=True)
        post = module.register_forward_hook(
            lambda m, args, kwargs, out: self._leave(root, out), with_kwargs=True, always_call=True)
        self._undo += [pre.remove, post.remove]

    def _wrap(self, obj: object, name: str, wrapper) -> None:
        own = name in vars(obj)
        original = getattr(obj, name)
        setattr(obj, name, wrapper(original))

        def undo():
            if own:
                setattr(obj, name, original)
            else:
                delattr(obj, name)
        self._undo.append(undo)

    def _region_method(self, kind: str, argument: str):
        def wrapper(original):
            signature = inspect.signature(original)

            @functools.wraps(original)
            def region(*args, **kwargs):
                self._enter(kind, False, signature.bind_partial(*args, **kwargs).arguments.get(argument))
                out = None
                try:
                    out = original(*args, **kwargs)
                    return out
                finally:
                    self._leave(False, out)
            return region
        return wrapper

    def _phase_method(self, phase: str):
        def wrapper(original):
            @functools.wraps(original)
            def timed(*args, **kwargs):
                start = self._clock()
                self._advance(start)
                try:
                    return original(*args, **kwargs)
                finally:
                    end = self._clock()
                    self._advance(end)
                    self._phase_s[phase] = self._phase_s.get(phase, 0.0) + end - start
            return timed
        return wrapper

    # -- events ---------------------------------------------------------------------------------

    def _reset(self) -> None:
        self._acc = {kind: {"fwd_s": 0.0, "bwd_s": 0.0} for kind in KINDS}
        self._stack: list[_Call] = []
        self._calls: list[_Call | None] = []
        self._whole_depth = 0
        self._root_depth = 0
        self._in_bwd = False
        self._last = self.clock()
        self._fwd_start = self._bwd_start = 0.0
        self._forward_s = self._backward_s = 0.0
        self._hooks_s = {"fwd": 0.0, "bwd": 0.0}
        self._phase_s: dict[str, float] = {}

    def _clock(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return self.clock()

    def _advance(self, now: float, begin: bool = False) -> None:
        """Charge the time since the last event to the innermost open region; at the start of a
        region's backward (`begin`), first close the leaves (regions whose inputs need no
        gradient) still open."""
        if self._stack and self._stack[-1].kind is not None:
            self._acc[self._stack[-1].kind]["bwd_s" if self._in_bwd else "fwd_s"] += now - self._last
        self._last = now
        if begin:
            self._close_open(leaves_only=True)

    def _close_open(self, leaves_only: bool) -> None:
        """Close the backward regions still open (only the leaves: regions whose inputs need no
        gradient, closed when the next region's backward starts)."""
        for call in [c for c in self._stack if c.state == OPEN and (c.leaf or not leaves_only)]:
            call.state = CLOSED
            self._stack.remove(call)

    def _done(self, now: float) -> None:
        """The end of a hook: its own time is bookkeeping, charged to no kind."""
        self._last = self.clock()
        self._hooks_s["bwd" if self._in_bwd else "fwd"] += self._last - now

    def _enter(self, kind: str | None, root: bool, inputs) -> None:
        now = self._clock()
        self._advance(now)
        if self._whole_depth and not root:  # inside a kind counted whole: not split out of it
            self._calls.append(None)
            self._done(now)
            return
        call = _Call(kind)
        self._calls.append(call)
        self._stack.append(call)
        if root:
            if self._root_depth == 0:
                self._fwd_start = now
            self._root_depth += 1
        if kind in WHOLE:
            self._whole_depth += 1
        if kind is not None and torch.is_grad_enabled():
            needing = {id(t): t for t in tensors(inputs) if t.requires_grad}
            call.pending = len(needing)
            for t in needing.values():
                t.register_hook(functools.partial(self._input_grad, call))
        self._done(now)

    def _leave(self, root: bool, output) -> None:
        now = self._clock()
        self._advance(now)
        call = self._calls.pop()
        if call is None:
            self._done(now)
            return
        self._stack.remove(call)
        if call.kind in WHOLE:
            self._whole_depth -= 1
        if root:
            self._root_depth -= 1
            if self._root_depth == 0:
                self._forward_s += now - self._fwd_start
        if call.kind is not None and torch.is_grad_enabled():
            call.leaf = call.pending == 0
            outs = {id(t): t for t in tensors(output) if t.requires_grad}
            for t in outs.values():
                t.register_hook(functools.partial(self._output_grad, call))
        self._done(now)

    def _start_backward(self, now: float) -> None:
        self._in_bwd = True
        self._bwd_start = now
        Variable._execution_engine.queue_callback(self._end_backward)

    def _output_grad(self, call: _Call, grad):
        now = self._clock()
        if not self._in_bwd:
            self._start_backward(now)
        self._advance(now, begin=True)
        if call.state == IDLE:
            call.state = OPEN
            self._stack.append(call)
        self._done(now)

    def _input_grad(self, call: _Call, grad):
        now = self._clock()
        if not self._in_bwd:
            self._start_backward(now)
        self._advance(now)
        call.pending -= 1
        if call.pending == 0:
            if call.state == OPEN:
                self._stack.remove(call)
            call.state = CLOSED
        self._done(now)

    def _end_backward(self) -> None:
        now = self._clock()
        self._advance(now)
        self._close_open(leaves_only=False)  # any still open (a leaf: the embedding)
        self._backward_s += now - self._bwd_start
        self._in_bwd = False
        self._done(now)

    # -- measuring ------------------------------------------------------------------------------

    def measure(self, step: Callable[[], object], steps: int) -> dict:
        """Run `step` `steps` times under the hooks; seconds per step (module docstring)."""
        if steps < 1:
            raise ValueError(f"the split needs at least one step, got steps={steps}")
        self._reset()
        total = 0.0
        for _ in range(steps):
            start = self._clock()
            self._last = start
            step()
            total += self._clock() - start
            if self._stack or self._calls or self._in_bwd:
                raise RuntimeError("step split: regions were left open after the step (a forward without its "
                                   "backward, or a backward the hooks did not see end); run whole training steps")
        return self.report(total, steps)

    def report(self, total: float, steps: int) -> dict:
        def r(x: float) -> float:
            return round(x / steps, 5)

        present = set(self.kinds.values()) | {m[2] for m in self.methods}
        kinds = {k: {"fwd_s": r(v["fwd_s"]), "bwd_s": r(v["bwd_s"])} for k, v in self._acc.items() if k in present}
        kind_fwd = sum(v["fwd_s"] for v in self._acc.values())
        kind_bwd = sum(v["bwd_s"] for v in self._acc.values())
        hooks = self._hooks_s["fwd"] + self._hooks_s["bwd"]
        out = {"steps": steps, "step_s": r(total), "forward_s": r(self._forward_s), "backward_s": r(self._backward_s)}
        out.update({f"{phase}_s": r(s) for phase, s in self._phase_s.items()})
        out["phases_sum_s"] = r(self._forward_s + self._backward_s + sum(self._phase_s.values()))
        out["hooks_s"] = r(hooks)
        out["kinds"] = kinds
        # What no kind holds: the forward's and backward's glue, and everything outside the two
        # (optimizer included); with the kinds and the hooks' bookkeeping it makes up the step.
        out["other"] = {"fwd_s": r(self._forward_s - kind_fwd - self._hooks_s["fwd"]),
                        "bwd_s": r(self._backward_s - kind_bwd - self._hooks_s["bwd"]),
                        "outside_s": r(total - self._forward_s - self._backward_s)}
        return out


def trainer_split(trainer, device: torch.device | str | None = None) -> StepSplit:
    """The split of our megatron Trainer.train_step: its model chunks, the postprocess method of
    each, the optimizer (Trainer.update: gradient norm, clipping, the step, the LR schedule) and
    megatron's gradient finalisation (the DP/TP reductions, the expert-bias update)."""
    inner = [getattr(chunk, "module", chunk) for chunk in trainer.model]
    # Its input is the decoder's output; megatron also passes it the embedding's output
    # (decoder_input), whose gradient comes only at the end of the backward.
    methods = [(m, "_postprocess", "output_loss", "hidden_states") for m in inner if hasattr(m, "_postprocess")]
    phases = {"optimizer": [(trainer, "update")]}
    config = getattr(trainer, "tconfig", None)
    if getattr(config, "finalize_model_grads_func", None) is not None:
        phases["grad_finalize"] = [(config, "finalize_model_grads_func")]
    return StepSplit(trainer.model, methods=methods, phases=phases, device=device or trainer.device)


def model_split(model: torch.nn.Module, loss: torch.nn.Module, optimizer, device=None) -> StepSplit:
    """The split of a plain PyTorch step (transformers' model): `loss` is the module computing the
    loss from the logits (counted with lm_head as output_loss), `optimizer` a torch optimizer."""
    device = device or next(model.parameters()).device
    return StepSplit([model, loss], extra={loss: "output_loss"}, phases={"optimizer": [(optimizer, "step")]},
                     device=device)
