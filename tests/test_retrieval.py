"""Stage 1 retrieval: exact top-k of *other* images, duplicates excluded, scalable index kinds."""
import numpy as np
import pytest

from realign_lib import retrieval


def _brute(x, k):
    x = retrieval.normalise(x)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sim, order, 1)


def test_flat_equals_brute_force_and_excludes_self():
    x = np.random.default_rng(0).normal(size=(300, 24)).astype(np.float32)
    index = retrieval.build_index(x, "flat")
    nbrs, scores, dups = retrieval.nearest_others(index, x, k=5)
    ref, ref_scores = _brute(x, 5)
    assert dups == 0
    assert not np.any(nbrs == np.arange(300)[:, None])
    assert np.array_equal(nbrs, ref)
    assert np.allclose(scores, ref_scores, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # sorted by similarity


def test_exact_duplicates_are_never_neighbours():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 16)).astype(np.float32)
    x = np.concatenate([x, x[:10], x[:10] * 3.0])  # copies (and scaled copies: same cosine)
    nbrs, scores, dups = retrieval.nearest_others(retrieval.build_index(x), x, k=4)
    assert dups >= 40
    base = np.concatenate([np.arange(50), np.arange(10), np.arange(10)])  # which original each row copies
    for i in range(len(x)):
        for j in nbrs[i]:
            assert base[j] != base[i] or j == -1, (i, j)
    assert np.all(scores < 0.9999)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_have_high_recall(kind):
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(40, 32))
    x = (centres[rng.integers(40, size=3000)] + 0.3 * rng.normal(size=(3000, 32))).astype(np.float32)
    exact, _, _ = retrieval.nearest_others(retrieval.build_index(x, "flat"), x, k=10)
    approx, _, _ = retrieval.nearest_others(retrieval.build_index(x, kind, nprobe=16), x, k=10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert recall >= 0.9, recall


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="unknown index kind 'annoy'"):
        retrieval.build_index(np.ones((4, 3)), "annoy")
    with pytest.raises(ValueError, match="2-D"):
        retrieval.normalise(np.ones(3))
    with pytest.raises(ValueError, match="IVF index needs at least"):
        retrieval.build_index(np.random.default_rng(0).normal(size=(10, 4)), "ivf", nlist=64)


def test_embeddings_resume_from_finished_chunks(tmp_path):
    from PIL import Image

    from tests.support import tiny_models as testing

    model, proc = testing.tiny_llava()
    paths = []
    rng = np.random.default_rng(0)
    for i in range(7):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    emb = retrieval.embed_images_resumable(model, proc, paths, tmp_path / "parts", chunk=3, batch_size=2,
                                           progress=False)
    assert emb.shape[0] == 7 and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    parts = sorted((tmp_path / "parts").rglob("part_*.npy"))
    assert len(parts) == 3
    # a finished chunk is reused, not recomputed: overwrite one and see it come back
    marker = np.ones_like(np.load(parts[1]))
    np.save(parts[1], marker)
    again = retrieval.embed_images_resumable(model, proc, paths, tmp_path / "parts", chunk=3, progress=False)
    assert np.allclose(again[3:6], retrieval.normalise(marker)) and np.allclose(again[:3], emb[:3])
    # a different image list never reuses those parts
    other = retrieval.embed_images_resumable(model, proc, paths[:4], tmp_path / "parts", chunk=3, progress=False)
    assert np.allclose(other, emb[:4], atol=1e-5)


def test_embeddings_of_another_model_or_a_changed_image_are_never_reused(tmp_path):
    """Stage 01 re-run with another model_path (or a redrawn image) must embed again, not return the
    old model's parts."""
    import os

    from PIL import Image

    from realign_lib.models import vlm
    from tests.support import tiny_models as testing

    model_a, proc = testing.tiny_llava(seed=1)
    model_b, _ = testing.tiny_llava(seed=2)
    model_a.config._name_or_path, model_b.config._name_or_path = "models/a", "models/b"
    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    a = retrieval.embed_images_resumable(model_a, proc, paths, tmp_path / "parts", chunk=2, progress=False)
    b = retrieval.embed_images_resumable(model_b, proc, paths, tmp_path / "parts", chunk=2, progress=False)
    fresh_b = retrieval.normalise(vlm.image_embeddings(model_b, proc, paths))
    assert not np.allclose(a, b, atol=1e-3) and np.allclose(b, fresh_b, atol=1e-5)
    # the same model, one image redrawn in place: its chunk is computed again
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(paths[3])
    st = os.stat(paths[3])
    os.utime(paths[3], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    a2 = retrieval.embed_images_resumable(model_a, proc, paths, tmp_path / "parts", chunk=2, progress=False)
    assert np.allclose(a2[:3], a[:3], atol=1e-5) and not np.allclose(a2[3], a[3], atol=1e-3)
