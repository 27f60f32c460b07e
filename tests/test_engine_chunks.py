"""CUDA-only code paths exercised on the CPU: out-of-memory split/retry, fp16/channels-last/
compile switches. ``torch.cuda.OutOfMemoryError`` is a plain exception class, so a callable
that raises it for chunks above a size stands in for a device that is too small."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serve_app.engine import stages
from serve_app.engine.chunks import ItemTooLarge, chunk_size, forward_chunks, is_oom, stopping
from serve_app.errors import Abandoned, ImageTooLargeForDevice, engine_error
from serve_app.options import EnhanceOptions


def _device(max_items: int, max_value: float = float("inf")):
    """A 'forward' that runs out of memory above ``max_items`` or on an item > max_value."""
    calls: list[int] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        if x.shape[0] > max_items or bool((x > max_value).any()):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return x * 2

    return fn, calls


def test_oom_is_recognised():
    assert is_oom(torch.cuda.OutOfMemoryError("x"))
    assert is_oom(RuntimeError("CUDA error: out of memory"))
    assert not is_oom(RuntimeError("shape mismatch"))
    assert not is_oom(ValueError("out of memory"))


def test_the_cpu_allocator_running_out_is_recognised_and_is_a_413():
    """A real CPU allocation that cannot be met (a petabyte): torch says "can't allocate
    memory", not "out of memory"; before this was recognised such an image was a 500."""
    with pytest.raises(RuntimeError) as info:
        torch.empty(1 << 50, dtype=torch.uint8)
    assert is_oom(info.value)
    err = engine_error(info.value)
    assert isinstance(err, ImageTooLargeForDevice) and err.status == 413
    assert err.code == "too_large_for_device" and "alloc" not in err.message

    def forward(x: torch.Tensor) -> torch.Tensor:  # each item alone needs a petabyte
        return torch.empty(x.shape[0] << 50, dtype=torch.uint8)

    with pytest.raises(ItemTooLarge) as too_large:
        list(forward_chunks(forward, [torch.zeros(1)] * 4, chunk=4))
    assert too_large.value.index == 0
    assert isinstance(engine_error(too_large.value), ImageTooLargeForDevice)


def test_chunk_size_follows_the_budget():
    assert chunk_size(64, 2**20) == 64
    assert chunk_size(64, 2**20, cap=8) == 8
    assert chunk_size(64, 16 * 2**20) == 4
    assert chunk_size(64, 2**40) == 1  # never zero


def test_oom_halves_the_chunk_and_every_item_comes_back_once():
    fn, calls = _device(max_items=3)
    items = [torch.full((2,), float(i)) for i in range(10)]
    got = list(forward_chunks(fn, items, chunk=8))
    starts = [s for s, _ in got]
    out = torch.cat([y for _, y in got])
    torch.testing.assert_close(out, torch.stack(items) * 2)
    assert starts == sorted(starts) and starts[0] == 0
    assert calls[0] == 8 and calls[1] == 4 and max(calls[2:]) <= 2  # 8 -> 4 -> 2, then kept


def test_other_errors_are_not_swallowed():
    def fn(x):
        raise ValueError("not memory")

    with pytest.raises(ValueError):
        list(forward_chunks(fn, [torch.zeros(1)] * 3, chunk=2))


def test_an_item_that_does_not_fit_alone_is_named_after_the_ones_before_it():
    fn, _ = _device(max_items=4, max_value=100)
    items = [torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([500.0]), torch.tensor([3.0])]
    done = []
    with pytest.raises(ItemTooLarge) as err:
        for start, y in forward_chunks(fn, items, chunk=4):
            done.append((start, y))
    assert err.value.index == 2
    assert torch.cat([y for _, y in done]).flatten().tolist() == [2.0, 4.0]


@pytest.fixture(scope="module")
def lanes():
    from serve_app.engine.chunks import Lanes

    before = torch.get_num_threads()
    lanes = Lanes(3)
    yield lanes
    lanes.close()
    assert torch.get_num_threads() == before


def test_lanes_run_one_torch_thread_each_and_leave_everyone_elses(lanes):
    """torch keeps a thread count per thread, and new threads copy the last one set: the
    lanes must hold 1 without handing it to threads started later (the replica's)."""
    import threading

    before = torch.get_num_threads()
    assert lanes.map(lambda _: torch.get_num_threads(), range(6)) == [1] * 6
    assert torch.get_num_threads() == before
    seen: list[int] = []
    later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    later.start()
    later.join()
    assert seen == [before]
    assert lanes.map(lambda _: torch.is_inference_mode_enabled(), range(3)) == [True] * 3


def test_lanes_give_every_chunk_back_once_in_order(lanes):
    import threading

    names: set[str] = set()

    def fn(x: torch.Tensor) -> torch.Tensor:
        names.add(threading.current_thread().name)
        return x * 2

    items = [torch.full((2,), float(i)) for i in range(11)]
    got = list(forward_chunks(fn, items, chunk=2, lanes=lanes))
    assert [s for s, _ in got] == [0, 2, 4, 6, 8, 10]
    torch.testing.assert_close(torch.cat([y for _, y in got]), torch.stack(items) * 2)
    assert names and all(n.startswith("engine-lane") for n in names)
    # One chunk only: in the caller's thread, with all its torch threads.
    names.clear()
    assert len(list(forward_chunks(fn, items[:2], chunk=2, lanes=lanes))) == 1
    assert names == {threading.current_thread().name}


def test_lanes_out_of_memory_goes_on_one_chunk_at_a_time(lanes):
    fn, calls = _device(max_items=1, max_value=100)
    items = [torch.tensor([float(i)]) for i in range(7)]
    got = list(forward_chunks(fn, items, chunk=2, lanes=lanes))
    assert [s for s, _ in got] == list(range(7))
    assert torch.cat([y for _, y in got]).flatten().tolist() == [2.0 * i for i in range(7)]
    assert 2 in calls and calls[-1] == 1

    items[5] = torch.tensor([500.0])  # does not fit alone: named by its place in the whole
    done: list[int] = []
    with pytest.raises(ItemTooLarge) as err:
        for start, _ in forward_chunks(fn, items, chunk=2, lanes=lanes):
            done.append(start)
    assert err.value.index == 5 and done == [0, 1, 2, 3, 4]


def test_lanes_pass_other_errors_on(lanes):
    def fn(x):
        raise ValueError("not memory")

    with pytest.raises(ValueError):
        list(forward_chunks(fn, [torch.zeros(1)] * 5, chunk=1, lanes=lanes))

    # map: the first error, raised once every call has ended (none still holds a lane).
    import threading

    done: list[int] = []
    release = threading.Event()

    def item(i: int) -> int:
        if i == 0:
            raise ValueError("first")
        release.wait(5)
        done.append(i)
        return i

    threading.Timer(0.2, release.set).start()
    with pytest.raises(ValueError, match="first"):
        lanes.map(item, range(3))
    assert sorted(done) == [1, 2]


@pytest.mark.parametrize("with_lanes", [False, True])
def test_a_set_stop_ends_the_forwards_at_the_next_chunk(lanes, with_lanes):
    """Chunks (in this thread or in lanes) check the stop before they run: once it is set,
    the rest raise ``Abandoned`` and are not forwarded; outside ``stopping`` it has no say."""
    import threading

    stop = threading.Event()
    ran: list[int] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        ran.append(int(x[0]))
        stop.set()  # the caller left during the first chunk
        return x

    items = [torch.tensor([float(i)]) for i in range(20)]
    with stopping(stop), pytest.raises(Abandoned):
        list(forward_chunks(fn, items, chunk=1, lanes=lanes if with_lanes else None))
    # The chunks already running end (at most one per lane); none starts after the stop.
    assert 1 <= len(ran) <= (lanes.n if with_lanes else 1)
    assert len(list(forward_chunks(fn, items, chunk=1, lanes=lanes if with_lanes else None))) == 20


def test_the_cpu_engine_has_lanes_unless_told_one(tiny_weights):
    from serve_app.config import AppConfig
    from serve_app.engine.engine import Engine

    def engine(lanes):
        return Engine.from_config(AppConfig.model_validate({
            "weights": {"dir": str(tiny_weights.dir)},
            "engine": {"device": "cpu", "cpu_lanes": lanes, "warmup": False},
        }))

    assert engine(1).lanes is None
    assert engine(3).lanes.n == 3
    default = engine(None).lanes
    assert (default.n if default else 1) == torch.get_num_threads()


def test_item_too_large_fails_its_image_only():
    """A stage whose chunked forward cannot fit one image's item: that image gets
    ImageTooLargeForDevice (413), the others of the batch go through."""
    fn, _ = _device(max_items=2, max_value=1000)

    def stage(engine, jobs):
        items = [torch.tensor([float(j.src.shape[0])]) for j in jobs]
        for start, y in forward_chunks(fn, items, chunk=8):
            for k, v in enumerate(y.tolist()):
                jobs[start + k].result = np.full((1,), v)

    jobs = [stages.BatchItem(src=np.zeros((s, 4, 3), np.uint8), opt=EnhanceOptions())
            for s in (10, 20, 5000, 30)]
    stages._run_stage(None, "restore", stage, jobs)
    assert [j.error is None for j in jobs] == [True, True, False, True]
    assert isinstance(jobs[2].error, ImageTooLargeForDevice) and jobs[2].error.status == 413
    assert [float(j.result[0]) for j in jobs if j.error is None] == [20.0, 40.0, 60.0]


def test_gpu_switches_stay_off_on_the_cpu(tiny_weights):
    """half and compile are CUDA-only: on the CPU they must leave fp32 eager networks (the
    path equal to upstream). channels_last holds on the CPU too, for the plain conv stacks
    (the upsampler, the parser) and never GFPGAN, which .view()s its features."""
    from serve_app.config import AppConfig
    from serve_app.engine.engine import Engine

    cfg = AppConfig.model_validate({
        "weights": {"dir": str(tiny_weights.dir)},
        "engine": {"device": "cpu", "half": True, "channels_last": True, "compile": True},
    })
    eng = Engine.from_config(cfg)
    assert eng.dtype == torch.float32 and eng.info()["dtype"] == "float32"
    net = eng.net("RealESRGAN_x2plus")
    assert isinstance(net, torch.nn.Module) and not hasattr(net, "_orig_mod")
    p = next(net.parameters())
    assert p.dtype == torch.float32
    assert net.conv_first.weight.is_contiguous(memory_format=torch.channels_last)
    assert not net.conv_first.weight.is_contiguous()
    parser = next(m for m in eng.net("parsing_parsenet").modules()
                  if isinstance(m, torch.nn.Conv2d))
    assert parser.weight.is_contiguous(memory_format=torch.channels_last)
    face = eng.net("GFPGANv1.4").conv_body_first.weight
    assert face.dtype == torch.float32 and face.is_contiguous()
    plain = Engine.from_config(cfg.model_copy(update={"engine": cfg.engine.model_copy(
        update={"channels_last": False})}))
    assert plain.net("RealESRGAN_x2plus").conv_first.weight.is_contiguous()


def test_fp16_and_channels_last_forward_on_the_cpu(engine):
    """The pieces the CUDA path uses (fp16 GFPGAN pre/post-processing, channels-last
    Real-ESRGAN) run on the CPU and stay close to fp32."""
    from serve_app.engine import restore

    net = engine.net("RealESRGAN_x2plus")
    x = torch.rand(1, 3, 24, 24)
    want = net(x)
    got = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    net.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    crop = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    h = restore._to_input(torch.from_numpy(crop), torch.float16)
    f = restore._to_input(torch.from_numpy(crop), torch.float32)
    assert h.dtype == torch.float16 and h.is_contiguous()
    torch.testing.assert_close(h.float(), f, atol=1e-3, rtol=0)


try:
    from _engine_fixtures import engine, tiny_weights  # noqa: E402,F401
except ImportError:
    from tests._engine_fixtures import engine, tiny_weights  # noqa: E402,F401
