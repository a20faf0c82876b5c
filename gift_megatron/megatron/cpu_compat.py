"""Run megatron-core 0.16 on a CPU-only torch (gloo): narrow, module-scoped patches.

Applied by `apply_if_no_cuda()` only when CUDA is absent; on GPUs nothing is touched. About 15
calls inside megatron-core assume CUDA (tensor factories with device="cuda", current_device(),
synchronize(), CUDA RNG state, `Tensor.type() == 'torch.cuda.FloatTensor'` checks). Two
techniques, each confined to the megatron modules that need it:

* module proxies: in the listed modules only, the global name `torch` is replaced by a proxy whose
  tensor factories map a CUDA device to CPU and whose `torch.cuda` answers current_device() with
  "cpu" and makes synchronize()/empty_cache() no-ops; all else is the real torch;
* call scopes: the few functions that compare `Tensor.type()` with 'torch.cuda.*' (or call
  `Tensor.cuda()`) run with CPU tensors reporting CUDA type strings (or staying on CPU), only for
  the duration of those calls.

Each patch names the megatron-core 0.16.1 source lines it covers (worked out for this project by
running megatron-core on gloo; docs/design.md, "CPU notes").
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types

import torch

log = logging.getLogger(__name__)


def _cpu_device(device):
    if device is None or isinstance(device, int):
        return None if device is None else "cpu"
    return "cpu" if torch.device(device).type == "cuda" else device


class _CudaOnCpu(types.ModuleType):
    """`torch.cuda` as seen by a patched megatron module."""

    def __init__(self) -> None:
        super().__init__("torch.cuda")

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    def current_device(self):
        return "cpu"

    def synchronize(self, device=None):
        return None

    def empty_cache(self):
        return None

    def get_rng_state(self, device="cuda"):
        return torch.get_rng_state()

    def set_rng_state(self, new_state, device="cuda"):
        torch.set_rng_state(new_state)

    def manual_seed(self, seed):
        torch.manual_seed(seed)


class _TorchOnCpu(types.ModuleType):
    """The module-global `torch` as seen by a patched megatron module."""

    FACTORIES = ("zeros", "ones", "empty", "tensor", "full", "arange", "rand", "randn", "randint")

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CudaOnCpu()
        for name in self.FACTORIES:
            setattr(self, name, self._factory(getattr(torch, name)))

    @staticmethod
    def _factory(fn):
        @functools.wraps(fn)
        def wrapped(*args, device=None, **kwargs):
            return fn(*args, device=_cpu_device(device), **kwargs)

        return wrapped

    def __getattr__(self, name):
        return getattr(torch, name)


_PROXY = _TorchOnCpu()

# module -> the megatron-core 0.16.1 lines whose CUDA assumptions the proxy covers
PROXIED_MODULES = {
    "megatron.core.utils":
        "631 GlobalMemoryBuffer.get_tensor (local attention); 1207 local_multi_tensor_l2_norm (grad norm)",
    "megatron.core.models.common.embeddings.rotary_pos_embedding":
        "162 inv_freq.to(torch.cuda.current_device()); 297",
    "megatron.core.pipeline_parallel.schedules": "596, 983, 2138 torch.zeros(..., device='cuda')",
    "megatron.core.pipeline_parallel.p2p_communication":
        "190-202, 313, 321 device=torch.cuda.current_device(); 242, 398 torch.cuda.synchronize()",
    "megatron.core.distributed.param_and_grad_buffer": "783, 800, 806 torch.zeros(device=current_device())",
    "megatron.core.distributed.distributed_data_parallel": "buffers on torch.cuda.current_device()",
    "megatron.core.optimizer.optimizer": "473, 481, 485, 907, 1141 torch.tensor(..., device='cuda')",
    "megatron.core.optimizer.clip_grads": "90, 103, 115, 174, 207 torch.zeros/tensor(..., device='cuda')",
    "megatron.core.optimizer.grad_scaler": "15, 88, 91, 94 torch.tensor(..., device='cuda')",
    "megatron.core.optimizer.distrib_optimizer": "791, 1077 device=torch.cuda.current_device()",
    "megatron.core.tensor_parallel.random":
        "55, 84-103 _get/_set_cuda_rng_state; 235-238 CudaRNGStatesTracker.add -> get_rng_state",
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "230 torch.cuda.synchronize()",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "204, 252 device='cuda'",
    "megatron.core.dist_checkpointing.strategies.async_utils": "165, 212, 604 (async save path)",
}


def _type_as_cuda(orig):
    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            s = orig(self)
            if self.device.type == "cpu" and s.startswith("torch.") and not s.startswith("torch.cuda."):
                return "torch.cuda." + s[len("torch."):]
            return s
        return orig(self, dtype, non_blocking, **kwargs)

    return type_


@contextlib.contextmanager
def cuda_type_strings():
    """Within this block, CPU tensors' `.type()` reads 'torch.cuda.XxxTensor'."""
    orig = torch.Tensor.type
    torch.Tensor.type = _type_as_cuda(orig)
    try:
        yield
    finally:
        torch.Tensor.type = orig


@contextlib.contextmanager
def tensor_cuda_is_identity():
    """Within this block, `Tensor.cuda()` leaves a CPU tensor where it is."""
    orig = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = orig


def _scoped(fn, context):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with context():
            return fn(*args, **kwargs)

    wrapped._gift_cpu_compat = True
    return wrapped


# (module, attribute path) -> (scope, lines): these callables run inside the scope
SCOPED_CALLS = {
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"): (cuda_type_strings, "clip_grads.py:167"),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"):
        (cuda_type_strings, "optimizer.py:671, 690"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__"):
        (cuda_type_strings, "distrib_optimizer.py:361, 420 (via _build_model_and_main_param_groups), 582"),
    ("megatron.core.models.common.language_module.language_module",
     "LanguageModule.setup_embeddings_and_output_layer"):
        (tensor_cuda_is_identity, "language_module.py:244 weight.data.cuda() (tied embeddings, PP > 1)"),
}


def _apply_scopes() -> None:
    for (module_name, path), (context, _lines) in SCOPED_CALLS.items():
        owner = importlib.import_module(module_name)
        *parents, attr = path.split(".")
        for p in parents:
            owner = getattr(owner, p)
        fn = getattr(owner, attr)
        if not getattr(fn, "_gift_cpu_compat", False):
            setattr(owner, attr, _scoped(fn, context))


def _apply_proxies() -> None:
    for module_name in PROXIED_MODULES:
        module = importlib.import_module(module_name)
        if module.torch is not _PROXY:
            assert module.torch is torch, module_name
            module.torch = _PROXY
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    # The tracker forks per-TP-rank RNG streams through these helpers: use the CPU generator.
    random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    # With CPU == "CUDA" generator, fork() warns that the CPU state changed inside the fork: expected.
    logging.getLogger(random.__name__).addFilter(lambda rec: "CPU RNG state changed" not in rec.getMessage())


def is_applied() -> bool:
    return importlib.import_module("megatron.core.utils").torch is _PROXY


def apply_if_no_cuda() -> bool:
    """Apply the CPU patches when CUDA is absent (idempotent). Returns whether they are active."""
    if torch.cuda.is_available():
        return False
    if not is_applied():
        _apply_proxies()
        _apply_scopes()
        log.info("megatron-core CPU compatibility applied to %d modules", len(PROXIED_MODULES))
    return True
