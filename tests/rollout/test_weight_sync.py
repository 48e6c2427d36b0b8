"""Bucketed weight sync: the pure bucketing / packing helpers, and the object-store path through real Ray actors."""

from __future__ import annotations

import time
import weakref

import numpy as np
import pytest
import torch

from posttrain.models.loading import load_model
from posttrain.rollout.buckets import ALIGN, bucketize, pack_bucket, skip_tied, unpack_bucket
from posttrain.rollout.weight_sync import WeightSync, WeightSyncError
from posttrain.rollout.worker import RolloutWorker, RolloutWorkerImpl


def named(sizes: dict[str, int]) -> list[tuple[str, torch.Tensor]]:
    """Tensors of the given byte sizes (uint8, so bytes == elements)."""
    return [(name, torch.zeros(size, dtype=torch.uint8)) for name, size in sizes.items()]


def names_per_bucket(sizes: dict[str, int], bucket_bytes: int) -> list[list[str]]:
    return [[name for name, _ in bucket] for bucket in bucketize(named(sizes), bucket_bytes)]


# ------------------------------------------------------------------------------------------ bucket boundaries


def test_buckets_fill_greedily_in_order():
    # every size rounds up to ALIGN=64 bytes: a, b, c take 64 each; 3 * 64 = 192 fits a 200-byte bucket, 4 do not
    sizes = {"a": 10, "b": 64, "c": 1, "d": 30, "e": 64}
    assert names_per_bucket(sizes, 200) == [["a", "b", "c"], ["d", "e"]]
    assert names_per_bucket(sizes, 192) == [["a", "b", "c"], ["d", "e"]]  # exactly full is still one bucket
    assert names_per_bucket(sizes, 191) == [["a", "b"], ["c", "d"], ["e"]]
    assert names_per_bucket(sizes, 10_000) == [["a", "b", "c", "d", "e"]]


def test_a_tensor_bigger_than_a_bucket_gets_its_own_bucket():
    sizes = {"small": 64, "huge": 1000, "after": 64, "after2": 64}
    assert names_per_bucket(sizes, 128) == [["small"], ["huge"], ["after", "after2"]]
    assert names_per_bucket({"huge": 1000}, 64) == [["huge"]]


def test_every_tensor_exactly_once_in_order_on_a_real_model(model_path):
    state = load_model(str(model_path)).state_dict()
    for bucket_bytes in (1, 4096, 50_000, 10**9):
        buckets = list(bucketize(state.items(), bucket_bytes))
        flat = [name for bucket in buckets for name, _ in bucket]
        assert flat == list(state)  # each once, in state_dict order
        assert all(bucket for bucket in buckets)
        for bucket in buckets:  # no bucket over the limit unless it is a single oversized tensor
            used = sum(-(-t.numel() * t.element_size() // ALIGN) * ALIGN for _, t in bucket)
            assert used <= bucket_bytes or len(bucket) == 1
    assert len(list(bucketize(state.items(), 1))) == len(state)  # 1 byte: one tensor per bucket
    assert len(list(bucketize(state.items(), 10**9))) == 1


def test_bucketize_is_lazy_one_bucket_ahead():
    pulled = []

    def tensors():
        for i in range(6):
            pulled.append(i)
            yield f"t{i}", torch.zeros(64, dtype=torch.uint8)

    buckets = bucketize(tensors(), 128)
    assert [n for n, _ in next(buckets)] == ["t0", "t1"]
    assert pulled == [0, 1, 2]  # t2 was read to learn that bucket 1 is full, nothing further
    with pytest.raises(ValueError, match="bucket_bytes"):
        next(bucketize(tensors(), 0))


def test_tied_weights_are_sent_once_and_lookalikes_are_not_dropped():
    embed = torch.randn(5, 3)
    other = embed.clone()  # equal values, other memory: kept
    named = [("embed", embed), ("middle", torch.ones(2)), ("head", embed), ("copy", other), ("half", embed[:2])]
    assert [n for n, _ in skip_tied(named)] == ["embed", "middle", "copy", "half"]
    empty = torch.zeros(0)
    assert [n for n, _ in skip_tied([("a", empty), ("b", empty)])] == ["a", "b"]  # nothing to save on empties


# ------------------------------------------------------------------------------------------ packing


def test_pack_unpack_round_trips_dtypes_shapes_and_layouts():
    base = torch.arange(12, dtype=torch.float32).view(3, 4)
    tensors = [
        ("fp32", torch.randn(3, 5)),
        ("bf16", torch.randn(7).to(torch.bfloat16)),
        ("int64", torch.tensor([1, -2, 3], dtype=torch.int64)),
        ("scalar", torch.tensor(2.5)),
        ("transposed", base.t()),  # not contiguous
        ("empty", torch.zeros(0, 4)),
        ("bool", torch.tensor([True, False, True])),
    ]
    specs, buffer = pack_bucket(tensors)
    assert isinstance(buffer, np.ndarray) and buffer.dtype == np.uint8
    assert all(spec.offset % ALIGN == 0 for spec in specs)
    unpacked = unpack_bucket(specs, buffer)
    assert list(unpacked) == [name for name, _ in tensors]
    for name, tensor in tensors:
        assert unpacked[name].dtype == tensor.dtype and unpacked[name].shape == tensor.shape, name
        assert torch.equal(unpacked[name], tensor), name
    # views, not copies: changing the buffer shows through
    buffer[specs[2].offset : specs[2].offset + 8] = 0
    assert unpack_bucket(specs, buffer)["int64"][0] == 0


def test_unpack_of_a_read_only_buffer_and_a_short_buffer():
    specs, buffer = pack_bucket([("w", torch.ones(4))])
    buffer.flags.writeable = False  # what ray.get returns from the object store
    assert torch.equal(unpack_bucket(specs, buffer)["w"], torch.ones(4))
    with pytest.raises(ValueError, match="bytes but its specs need"):
        unpack_bucket(specs, buffer[:8])


def test_unknown_transport_is_refused():
    with pytest.raises(ValueError, match="sync_transport: unknown 'carrier_pigeon'"):
        WeightSync(None, [], "carrier_pigeon", 1.0, 10.0)


# ------------------------------------------------------------------------------------------ through Ray


class SlowLoadingWorker(RolloutWorkerImpl):
    """A worker whose weight load hangs (a stuck engine)."""

    def load_weight_buckets(self, refs, timeout_s):
        time.sleep(120)


def test_object_store_sync_streams_buckets_into_every_worker(ray_session, model_path, other_model_path):
    """Learner weights (from another seed) reach two workers bitwise, in many small buckets."""
    ray = ray_session
    from posttrain.learner.actors import Learner
    from posttrain.learner.learner import LearnerSettings

    learner = Learner.remote(LearnerSettings(model_path=str(other_model_path), num_threads=1))
    workers = [RolloutWorker.remote(engine="hf", model_path=str(model_path), num_threads=1) for _ in range(2)]
    try:
        ray.get([learner.ready.remote()] + [w.ready.remote() for w in workers], timeout=120)
        expected = load_model(str(other_model_path)).state_dict()
        before = ray.get(workers[0].get_weights.remote(), timeout=60)
        assert not all(torch.equal(before[n], expected[n]) for n in expected)
        bucket_mb = 0.05  # ~52 KB: the tiny model (~400 KB) goes in several buckets
        metrics = WeightSync(learner, workers, "object_store", bucket_mb, timeout_s=60)()
        total_mb = sum(t.numel() * t.element_size() for t in expected.values()) / 2**20
        assert metrics["sync/buckets"] >= total_mb / bucket_mb
        assert metrics["sync/megabytes"] == pytest.approx(total_mb, rel=0.05)
        assert metrics["time/sync"] > 0
        for worker in workers:
            synced = ray.get(worker.get_weights.remote(), timeout=60)
            assert synced.keys() == expected.keys()
            for name, tensor in expected.items():
                assert torch.equal(synced[name], tensor), name
    finally:
        for actor in [learner, *workers]:
            ray.kill(actor)


def test_a_hung_worker_fails_the_sync_naming_it_and_the_timeout(ray_session, model_path):
    ray = ray_session
    from posttrain.learner.actors import Learner
    from posttrain.learner.learner import LearnerSettings

    learner = Learner.remote(LearnerSettings(model_path=str(model_path), num_threads=1))
    good = RolloutWorker.remote(engine="hf", model_path=str(model_path), num_threads=1)
    hung = ray.remote(SlowLoadingWorker).remote(engine="hf", model_path=str(model_path), num_threads=1)
    try:
        ray.get([learner.ready.remote(), good.ready.remote(), hung.ready.remote()], timeout=120)
        start = time.perf_counter()
        # 15 s: enough for the learner to pack and the good worker to load on a loaded 2-core machine
        with pytest.raises(
            WeightSyncError,
            match=r"loading 1 weight buckets did not finish within the sync's 15 s \(rollout.sync_timeout_s\): "
            r"rollout worker 1 still running",
        ):
            WeightSync(learner, [good, hung], "object_store", 1.0, timeout_s=15)()
        assert time.perf_counter() - start < 40

        ray.kill(good)  # a dead worker: named, and no waiting for the timeout
        start = time.perf_counter()
        with pytest.raises(WeightSyncError, match="rollout worker 0 died during loading"):
            WeightSync(learner, [good], "object_store", 1.0, timeout_s=60)()
        assert time.perf_counter() - start < 30
    finally:
        for actor in (learner, good, hung):
            ray.kill(actor)


def test_a_bucket_that_cannot_be_fetched_times_out_in_the_worker(ray_session, engine):
    """The worker's own bound: a ref whose object never appears (here: a task that sleeps) fails the load."""
    ray = ray_session

    @ray.remote
    def never():
        time.sleep(60)

    from posttrain.rollout.weight_sync import load_buckets

    pending = never.remote()
    with pytest.raises(WeightSyncError, match=r"fetching bucket 1/1 .* within 0.5 s"):
        load_buckets(engine, [pending], timeout_s=0.5)
    ray.cancel(pending, force=True)


def test_a_tied_model_loads_a_sync_without_its_tied_head(tmp_path, model_path):
    """SmolLM2 ties lm_head to the embeddings: the sync sends the shared tensor once, and the engine's tied head
    follows (same model built twice with tied embeddings, different seeds)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from posttrain.rollout.hf_engine import HFEngine

    config = LlamaConfig.from_pretrained(model_path)
    config.tie_word_embeddings = True
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(LlamaForCausalLM(config))
    models[0].save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(tmp_path)
    engine = HFEngine(tmp_path, device="cpu")
    update = dict(skip_tied(models[1].state_dict().items()))
    assert "lm_head.weight" not in update and "model.embed_tokens.weight" in update
    engine.load_weights(update)
    synced = engine.get_weights()
    for name, tensor in models[1].state_dict().items():
        assert torch.equal(synced[name], tensor), name


def test_skip_tied_never_mistakes_a_freed_tensors_address_for_a_tie():
    """Fresh tensors (LoRA-merged copies) dropped by the consumer free their memory, and the next one of the same size
    often gets the same address: each must still be passed on (the old address-only check skipped them)."""

    def fresh():
        for i in range(50):
            yield f"t{i}", torch.full((4096,), float(i))

    assert [name for name, _ in skip_tied(fresh())] == [f"t{i}" for i in range(50)]


def test_skip_tied_lets_each_passed_on_copy_be_freed_before_the_next():
    """The tie check holds no strong reference: a dequantized/merged copy the consumer has packed and dropped is freed
    before the next one is made, so a sync of a QLoRA model never holds a full-precision copy of it all at once."""
    alive = []

    def fresh():
        for i in range(5):
            tensor = torch.full((1024,), float(i))
            alive.append(weakref.ref(tensor))
            yield f"t{i}", tensor
            del tensor

    for name, tensor in skip_tied(fresh()):
        del tensor  # the consumer packs it and drops it; only the generators' current one may still be alive
        assert [ref() is not None for ref in alive[:-1]] == [False] * (len(alive) - 1), name
