"""The GPU path, checked on a CPU where it can be: the precision choice and the CUDA math settings with a
mocked device; the host-sync fixes (EMA, feature cache, eval's confusion matrix) giving the numbers the code
they replace gave, without reading tensors back per step. The `gpu` tests at the end count real syncs per
step with torch.cuda.set_sync_debug_mode (skipped without CUDA)."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, TensorDataset

from transfer_cli.config.schema import TrainerConfig, TransformsConfig
from transfer_cli.data.loaders import TransformedDataset, make_loader
from transfer_cli.data.synthetic import SyntheticImages
from transfer_cli.data.transforms import eval_transform, resolve_preprocessing
from transfer_cli.inference.evaluate import count_predictions
from transfer_cli.models.runtime import Precision, configure_cuda_math, resolve_precision
from transfer_cli.training import assemble, feature_cache
from transfer_cli.training.feature_cache import cached_splits, compute_features, feature_home
from transfer_cli.training.loop import EMA, StepRunner, Tally, train_one_epoch

from conftest import FAST, compose_train
from helpers import tiny_resnet


CPU = torch.device("cpu")
CUDA = torch.device("cuda")


# --------------------------------------------------------------------------- precision: bf16 only where native


def fake_gpu(native_bf16: bool) -> tuple[Callable[..., bool], list[bool]]:
    """torch.cuda.is_bf16_supported of a GPU with (A100, H100) or without (T4, V100: emulated) bf16 tensor cores."""
    asked: list[bool] = []

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return native_bf16 or including_emulation

    return is_bf16_supported, asked


@pytest.mark.parametrize(("native", "dtype"), [(False, torch.float16), (True, torch.bfloat16)],
                         ids=["t4-v100-emulated-bf16", "ampere-native-bf16"])
def test_amp_picks_bf16_only_where_the_gpu_computes_it_natively(
        monkeypatch: pytest.MonkeyPatch, native: bool, dtype: torch.dtype) -> None:
    fake, asked = fake_gpu(native)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", fake)
    with warnings.catch_warnings():  # GradScaler("cuda") on a machine without CUDA says it is disabled
        warnings.simplefilter("ignore")
        precision, scaler = resolve_precision(TrainerConfig(), CUDA)
    assert precision.amp_dtype == dtype
    assert (scaler is not None) == (dtype == torch.float16), "fp16 trains with a GradScaler, bf16 without"
    assert asked == [False], "asked without emulation"


def test_amp_on_the_cpu_asks_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    fake, asked = fake_gpu(False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", fake)
    precision, scaler = resolve_precision(TrainerConfig(amp="true"), CPU)
    assert (precision.amp_dtype, scaler, asked) == (torch.bfloat16, None, [])


# --------------------------------------------------------------------------- cudnn.benchmark and TF32


def cuda_math() -> tuple[bool, bool, bool]:
    return torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def set_cuda_math(benchmark: bool, matmul_tf32: bool, cudnn_tf32: bool) -> None:
    torch.backends.cudnn.benchmark = benchmark
    torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    torch.backends.cudnn.allow_tf32 = cudnn_tf32


@pytest.fixture
def cuda_math_off() -> Iterator[None]:
    """All three off, and put back afterwards: they are process-wide (monkeypatch cannot restore the
    cuBLAS flag, which is no plain attribute)."""
    before = cuda_math()
    set_cuda_math(False, False, False)
    try:
        yield
    finally:
        set_cuda_math(*before)


def test_a_cuda_run_autotunes_convolutions_and_uses_tf32(cuda_math_off: None) -> None:
    configure_cuda_math(CUDA)
    assert cuda_math() == (True, True, True)


def test_benchmark_mode_can_be_left_off_for_repeatable_numbers(cuda_math_off: None) -> None:
    configure_cuda_math(CUDA, benchmark=False)
    assert cuda_math() == (False, True, True)


def test_trainer_deterministic_turns_autotuning_and_tf32_off(cuda_math_off: None, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        configure_cuda_math(CUDA, deterministic=True)
        assert cuda_math() == (False, False, False) and torch.backends.cudnn.deterministic
    finally:
        torch.backends.cudnn.deterministic = False
    asked: list[dict] = []
    monkeypatch.setattr(assemble, "configure_cuda_math", lambda device, **kw: asked.append(kw))
    assemble.prepare(compose_train(FAST + ["trainer.deterministic=true"]), tmp_path)
    assert asked == [{"deterministic": True}]


def test_a_cpu_run_leaves_the_cuda_settings_alone(cuda_math_off: None) -> None:
    configure_cuda_math(CPU)
    assert cuda_math() == (False, False, False)


def test_a_training_run_configures_its_device_when_it_resolves_its_runtime(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cuda_math_off: None) -> None:
    devices: list[torch.device] = []
    monkeypatch.setattr(assemble, "configure_cuda_math", lambda device, **kw: (devices.append(device),
                                                                                configure_cuda_math(device, **kw)))
    assemble.prepare(compose_train(FAST), tmp_path)
    assert devices == [CPU] and cuda_math() == (False, False, False)


# --------------------------------------------------------------------------- host reads, counted on the CPU

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")


@contextmanager
def host_reads() -> Iterator[Counter]:
    """Every call that brings a tensor's values to Python or to host memory: on CUDA each waits for the device.
    On the CPU nothing waits, but the calls are the same, so counting them catches a per-step read."""
    seen: Counter = Counter()
    with pytest.MonkeyPatch.context() as patch:
        for name in HOST_READS:
            real = getattr(torch.Tensor, name)

            def spy(self: torch.Tensor, *args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
                seen[_name] += 1
                return _real(self, *args, **kwargs)

            patch.setattr(torch.Tensor, name, spy)
        yield seen


def small_net(seed: int = 0) -> nn.Module:
    """Conv, BatchNorm (float and int64 buffers), linear."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def sgd_steps(net: nn.Module, steps: int, after: Callable[[], None], seed: int = 1) -> None:
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = net(torch.randn(8, 3, 8, 8, generator=generator)).logsumexp(1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        after()


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    mine, theirs = a.state_dict(), b.state_dict()
    assert mine.keys() == theirs.keys()
    for key, tensor in mine.items():
        assert tensor.dtype == theirs[key].dtype and torch.equal(tensor, theirs[key]), key


def test_the_ema_averages_exactly_as_averaged_model_did() -> None:
    """Same weights, same BatchNorm statistics and batch counters, same n_averaged, step by step; and a state
    saved by AveragedModel (checkpoints of earlier versions) resumes into the EMA and continues alike."""
    net = small_net()
    reference = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    ema = EMA(net, 0.9)

    def both() -> None:
        reference.update_parameters(net)
        ema.update_parameters(net)
        assert_same_state(ema, reference)

    sgd_steps(net, 5, both)
    assert int(ema.n_averaged) == 5
    resumed = EMA(small_net(seed=7), 0.9)
    resumed.load_state_dict(reference.state_dict())

    def continued() -> None:
        reference.update_parameters(net)
        resumed.update_parameters(net)
        assert_same_state(resumed, reference)

    sgd_steps(net, 3, continued, seed=2)
    assert int(resumed.n_averaged) == 8


def test_the_ema_update_reads_nothing_back_where_averaged_model_did_every_step() -> None:
    net = small_net()
    ema = EMA(net, 0.9)
    with host_reads() as reads:
        sgd_steps(net, 4, lambda: ema.update_parameters(net))
    assert reads == Counter()
    reference = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    with host_reads() as reads:
        sgd_steps(net, 4, lambda: reference.update_parameters(net))
    assert reads["__bool__"] >= 4, "the counter catches AveragedModel's per-step read"
    # after loading a state, the EMA reads its counter once
    ema.load_state_dict(reference.state_dict())
    with host_reads() as reads:
        sgd_steps(net, 3, lambda: ema.update_parameters(net))
    assert reads == Counter(item=1)


def test_the_ema_lives_on_the_network_s_device() -> None:
    ema = EMA(small_net(), 0.5)
    assert {t.device for t in ema.state_dict().values()} == {CPU}


def classifier_and_data(images: int, batch: int, num_classes: int = 6) -> tuple[nn.Module, DataLoader]:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, num_classes))
    data = TensorDataset(torch.randn(images, 3, 4, 4), torch.arange(images) % num_classes)
    return net, DataLoader(data, batch_size=batch)


def test_the_confusion_matrix_counts_as_bincount_did() -> None:
    """37 images in batches of 8 (a ragged last one), 6 classes (top-5 too): the matrix index_add_ fills is the
    one bincount counted; top-k hits and the summed loss as before."""
    net, loader = classifier_and_data(37, 8)
    counts = count_predictions(net, loader, Precision(CPU), 6)
    images, labels = loader.dataset.tensors
    with torch.no_grad():
        logits = net(images)
    top = logits.topk(5, dim=1).indices
    expected = torch.bincount(labels * 6 + top[:, 0], minlength=36).view(6, 6).tolist()
    assert counts.confusion == expected and sum(map(sum, expected)) == 37
    assert counts.topk_hits == {1: int((top[:, 0] == labels).sum()), 5: int((top == labels[:, None]).any(1).sum())}
    assert counts.loss_sum == pytest.approx(float(nn.functional.cross_entropy(logits, labels, reduction="sum")))


def test_eval_reads_the_device_once_whatever_the_batch_count() -> None:
    per_batches = []
    for batches in (2, 6):
        net, loader = classifier_and_data(8 * batches, 8)
        with host_reads() as reads:
            count_predictions(net, loader, Precision(CPU), 6)
        per_batches.append(reads)
    # the matrix and the top-k hits (tolist), the loss (item); the loader's base seed is an item of a CPU tensor
    assert per_batches[0] == per_batches[1] and per_batches[0]["tolist"] == 2


def synthetic_model_and_data(images: int) -> tuple[Any, TransformedDataset, list[int]]:
    model = tiny_resnet(num_classes=3)
    preprocessing = resolve_preprocessing(model.preprocessing, TransformsConfig(image_size=32, crop_pct=1.0),
                                          model.pretrained)
    data = SyntheticImages(3, images, 32, seed=0)
    return model, TransformedDataset(data, eval_transform(preprocessing)), list(data.targets)


def test_features_cross_to_the_host_once_not_per_batch() -> None:
    model, data, labels = synthetic_model_and_data(40)
    loader = make_loader(data, 8, train=False, num_workers=0, seed=0, pin_memory=False)
    with host_reads() as reads:
        features, computed = compute_features(model, loader, Precision(CPU))
    assert reads["cpu"] == 1 and computed.tolist() == labels
    # where the gathering budget (a share of the device's free memory) fills first, it moves in a few copies:
    # the same features
    with host_reads() as reads:
        chunked, _ = compute_features(model, loader, Precision(CPU), gather_budget=2.5 * 8 * features.shape[1] * 4)
    assert reads["cpu"] == 2 and torch.equal(chunked, features)  # 5 batches: moved after the 3rd and at the end


def test_cached_features_stay_on_the_gpu_while_they_take_at_most_their_share(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 80_000))
    share = int(1000 * feature_cache.RESIDENT_SHARE)
    assert feature_home(share, CUDA) == CUDA
    assert feature_home(share + 1, CUDA) == CPU
    assert feature_home(10**15, CPU) == CPU


def test_cached_features_too_large_for_the_gpu_are_served_from_pinned_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA run whose features exceed their share of free memory keeps them on the host; its loaders pin
    the batches, so each step's copy overlaps (the features themselves are computed here on the CPU)."""
    model, data, labels = synthetic_model_and_data(24)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1024, 80_000))
    real = feature_cache.compute_features
    monkeypatch.setattr(feature_cache, "compute_features",
                        lambda model, loader, precision: real(model, loader, Precision(CPU)))

    def make(dataset: Any, size: int, train: bool) -> DataLoader:
        return make_loader(dataset, size, train=train, num_workers=0, seed=0, pin_memory=False)

    cached = cached_splits(model, {"train": (data, labels), "val": (data, labels)}, make, batch_size=8,
                           eval_batch_size=8, seed=0, precision=Precision(CUDA), key_extra="test",
                           cache_dir=tmp_path)
    assert cached.train_loader.pin_memory and cached.val_loader.pin_memory
    assert cached.train_loader.dataset.tensors[0].device == CPU


def test_an_epoch_reads_the_device_only_at_its_finite_loss_checks() -> None:
    """Tally keeps the sums on the device: twice the batches add exactly one more check (check_every=8)."""
    reads = []
    for batches in (8, 16):
        net, loader = classifier_and_data(8 * batches, 8)
        runner = StepRunner(net, torch.optim.SGD(net.parameters(), lr=0.1), nn.CrossEntropyLoss(), Precision(CPU))
        scheduler = torch.optim.lr_scheduler.LambdaLR(runner.optimizer, lambda step: 1.0)
        tally = Tally(CPU, (1,))
        with host_reads() as counted:
            train_one_epoch(runner, loader, scheduler, tally, check_every=8)
        reads.append(counted)
    assert reads[1] - reads[0] == Counter(item=1)


# --------------------------------------------------------------------------- syncs counted on a GPU

def gpu_only(function: Callable[..., None]) -> Callable[..., None]:
    """The `gpu` marker, and a skip where CUDA is absent."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(function))


@contextmanager
def cuda_syncs() -> Iterator[list[Any]]:
    """Warnings torch.cuda.set_sync_debug_mode("warn") raises, one per synchronizing CUDA call."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            torch.cuda.set_sync_debug_mode("default")
    caught[:] = [w for w in caught if "synchroniz" in str(w.message)]


def syncs_per_step(run: Callable[[int], None]) -> float:
    """Syncs of `run(steps)` per step beyond a fixed cost: (6 steps - 2 steps) / 4."""
    counts = []
    for steps in (2, 6):
        with cuda_syncs() as caught:
            run(steps)
        counts.append(len(caught))
    return (counts[1] - counts[0]) / 4


def gpu_batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 3, 32, 32, generator=generator).pin_memory(),
             torch.randint(0, 3, (8,), generator=generator).pin_memory()) for _ in range(count)]


@gpu_only
@pytest.mark.parametrize("with_ema", [False, True], ids=["plain", "ema"])
def test_gpu_training_steps_do_not_sync(with_ema: bool) -> None:
    model = tiny_resnet(num_classes=3).model.to(CUDA, memory_format=torch.channels_last)
    precision = Precision(CUDA, torch.bfloat16, channels_last=True)
    ema = EMA(model, 0.99) if with_ema else None
    runner = StepRunner(model, torch.optim.AdamW(model.parameters(), lr=1e-3), nn.CrossEntropyLoss(), precision,
                        grad_clip=1.0, ema=ema, averaged=model if with_ema else None)
    tally = Tally(CUDA, (1,))
    batches = gpu_batches(6)
    runner(*precision.to_device(*batches[0]), tally)  # the optimizer's and the EMA's first step: their state

    def run(steps: int) -> None:
        for images, labels in batches[:steps]:
            runner(*precision.to_device(images, labels), tally)

    assert syncs_per_step(run) == 0


@gpu_only
def test_gpu_cached_head_trains_from_device_memory_without_syncs(tmp_path: Path) -> None:
    model, data, labels = synthetic_model_and_data(96)
    model.model.to(CUDA)
    precision = Precision(CUDA)

    def make(dataset: Any, size: int, train: bool) -> DataLoader:
        return make_loader(dataset, size, train=train, num_workers=0, seed=0, pin_memory=True)

    cached = cached_splits(model, {"train": (data, labels), "val": (data, labels)}, make, batch_size=8,
                           eval_batch_size=8, seed=0, precision=precision, key_extra="gpu-test", cache_dir=tmp_path)
    assert cached.train_loader.dataset.tensors[0].device.type == "cuda"
    head = cached.head
    runner = StepRunner(head, torch.optim.AdamW(head.parameters(), lr=1e-3), nn.CrossEntropyLoss(), precision,
                        ema=EMA(model.model, 0.99), averaged=model.model)
    tally = Tally(CUDA, (1,))
    warm = next(iter(cached.train_loader))
    runner(*precision.to_device(*warm), tally)

    def run(steps: int) -> None:
        batches = iter(cached.train_loader)
        for _ in range(steps):
            runner(*precision.to_device(*next(batches)), tally)

    assert syncs_per_step(run) == 0


@gpu_only
def test_gpu_feature_extraction_and_eval_sync_once_whatever_the_batch_count() -> None:
    model, data, labels = synthetic_model_and_data(48)
    model.model.to(CUDA)
    precision = Precision(CUDA, torch.bfloat16)

    def extract(batches: int) -> None:
        subset = torch.utils.data.Subset(data, range(8 * batches))
        compute_features(model, make_loader(subset, 8, train=False, num_workers=0, seed=0, pin_memory=True),
                         precision)

    def evaluate(batches: int) -> None:
        subset = torch.utils.data.Subset(data, range(8 * batches))
        count_predictions(model.model, make_loader(subset, 8, train=False, num_workers=0, seed=0, pin_memory=True),
                          precision, 3)

    assert syncs_per_step(extract) == 0
    assert syncs_per_step(evaluate) == 0
