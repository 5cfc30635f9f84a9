import shutil

import numpy as np
import pytest
import torch

import cycle.shard_builder as shard_builder
from cycle.checkpoint import save_classifier
from cycle.config import load_config
from cycle.data.films import FilmSet, shuffled_rows
from cycle.data.records import records_of, scan
from cycle.data.shards import ShardError, decode_png, read_manifest, shard_files
from cycle.data.transforms import preprocess_from_config
from cycle.lungseg.masks import save_lung_model
from cycle.lungseg.unet import build_unet
from cycle.models import build_model
from cycle.shard_builder import EnhanceWorker, build_shards, enhance_inprocess

pytestmark = pytest.mark.ray


def written_rows(shard_dir):
    """Every row of a build's files, in file order, as the files hold them."""
    import pyarrow.parquet as pq

    rows = []
    for file in shard_files(shard_dir):
        rows += pq.read_table(
            file, columns=["position", "path", "image", "status", "donor"]
        ).to_pylist()
    return rows


def ok_films(shard_dir):
    """path -> (position, decoded enhanced film, donor) of the ok rows."""
    return {
        r["path"]: (r["position"], decode_png(r["image"]), r["donor"])
        for r in written_rows(shard_dir)
        if r["status"] == "ok"
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory, phantom_root):
    tmp = tmp_path_factory.mktemp("shards")
    tree = tmp / "chest_xray"
    shutil.copytree(phantom_root / "train", tree / "train")
    (tree / "train" / "NORMAL" / "IM-999999-0001.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    cfg = load_config(
        None,
        [
            f"output_dir={tmp}",
            "data.image_size=48",
            "enhance.mode=highlight",
            "enhance.strength=0.7",
            "cam.batch_size=16",
        ],
    )
    torch.manual_seed(0)
    classifier = save_classifier(tmp / "clf.pt", build_model("tinyvgg", image_size=48), cfg)
    unet = build_unet()
    save_lung_model(tmp / "unet.pt", unet, image_size=32)
    records = records_of(scan(tree).records + [], "train")
    # scan() skipped the broken file; the shard build must meet it too, so add it back as a record
    from cycle.data.records import Record

    records.append(
        Record(str(tree / "train" / "NORMAL" / "IM-999999-0001.png"), 0, "train", "IM-999999")
    )
    return cfg, records, classifier, tmp / "unet.pt", tmp


def test_build_counts_add_up_skips_bad_files_and_reruns_as_a_no_op(setup, ray_session):
    cfg, records, clf, unet, tmp = setup
    out = tmp / "build"
    manifest = build_shards(cfg, records, clf, unet, out, log=lambda *_: None)
    counts = manifest["counts"]
    assert counts["in"] == len(records) == counts["written"] + counts["skipped"]
    assert counts["skipped"] == 1 and list(manifest["skip_reasons"]) == ["not a decodable image"]
    assert sum(s["ok_rows"] for s in manifest["shards"]) == counts["written"]
    stamp = (out / "manifest.json").stat().st_mtime_ns
    lines = []
    assert (
        build_shards(cfg, records, clf, unet, out, log=lines.append)["build_key"]
        == manifest["build_key"]
    )
    assert (out / "manifest.json").stat().st_mtime_ns == stamp and "nothing to do" in lines[0]


def test_shards_read_back_equal_the_enhanced_images(setup, ray_session):
    cfg, records, clf, unet, tmp = setup
    out = tmp / "build"
    build_shards(cfg, records, clf, unet, out, log=lambda *_: None)
    rows = written_rows(out)
    # The files hold the build's order: positions 0..n-1, each file a contiguous run of it.
    assert [r["position"] for r in rows] == list(range(len(records)))
    worker = EnhanceWorker.from_config(str(clf), str(unet), cfg)
    reference = {}
    for batch in enhance_inprocess(cfg, records, worker, batch_size=16):
        for path, png, status in zip(batch["path"], batch["image"], batch["status"]):
            if status == "ok":
                reference[path] = png
    films = ok_films(out)
    assert len(films) == len(reference) == len(records) - 1
    for path, (_, film, _) in films.items():
        np.testing.assert_array_equal(film, decode_png(reference[path]))
        assert film.shape == (55, 55)  # R = round(48 / 0.875): the pre-crop geometry
    # What training reads: the ok rows of the split, in the build's order, read in this process
    # and through Ray Data alike.
    pre = preprocess_from_config(cfg.data)
    enhanced = FilmSet.enhanced(out, "train")
    assert enhanced.label_counts() == (
        sum(r.label == 0 for r in records) - 1,  # the broken file is a NORMAL one
        sum(r.label == 1 for r in records),
    )
    local = list(enhanced.local_batches(pre, cfg.data.max_image_pixels))
    index = np.concatenate([b["index"] for b in local])
    by_position = {position: film for position, film, _ in films.values()}
    assert index.tolist() == sorted(by_position)
    for batch in local:
        for i, image in zip(batch["index"], batch["image"]):
            np.testing.assert_array_equal(image, by_position[int(i)])
    assert not list(FilmSet.enhanced(out, "val").local_batches(pre, cfg.data.max_image_pixels))
    streamed = list(
        enhanced.ray_dataset(pre, cfg.data.max_image_pixels).iter_batches(
            batch_size=None, batch_format="numpy"
        )
    )
    assert np.concatenate([b["index"] for b in streamed]).tolist() == index.tolist()
    np.testing.assert_array_equal(
        np.concatenate([b["image"] for b in streamed]),
        np.concatenate([b["image"] for b in local]),
    )
    rows = enhanced.ray_dataset(pre, cfg.data.max_image_pixels, decode=False)
    listed = enhanced.decoded_rows(
        rows.iter_batches(batch_size=64, batch_format="numpy"), pre, cfg.data.max_image_pixels
    )
    np.testing.assert_array_equal(
        np.concatenate([b["image"] for b in listed]),
        np.concatenate([b["image"] for b in local]),
    )
    # The in-process writer (used inside Tune trials) writes the same rows and the same manifest
    # counts.
    manifest = build_shards(
        cfg, records, clf, unet, tmp / "inprocess", inprocess=True, log=lambda *_: None
    )
    assert manifest["counts"] == read_manifest(out)["counts"]
    same = ok_films(tmp / "inprocess")
    assert same.keys() == films.keys()
    for path, (position, film, _) in films.items():
        assert same[path][0] == position
        np.testing.assert_array_equal(same[path][1], film)


def test_the_training_shuffle_does_not_depend_on_how_rows_are_batched():
    rows = {"index": np.arange(50), "image": np.zeros((50, 2, 2), np.uint8), "label": np.zeros(50)}

    def cut(size):
        return [{k: v[s : s + size] for k, v in rows.items()} for s in range(0, 50, size)]

    def order(size, capacity, seed):
        rng = np.random.default_rng(seed)
        return [i for i, _, _ in shuffled_rows(cut(size), capacity, rng)]

    assert order(7, 16, 3) == order(50, 16, 3) == order(1, 16, 3)
    assert sorted(order(7, 16, 3)) == list(range(50))
    assert order(7, 16, 3) != order(7, 16, 4)
    assert order(7, 16, 3) != list(range(50))
    # a buffer that holds every row draws a uniform permutation: the last row can come first
    assert any(order(10, 64, seed)[0] == 49 for seed in range(200))


def test_interrupted_build_leaves_nothing_readable_and_a_rerun_completes(
    setup, ray_session, monkeypatch
):
    cfg, records, clf, unet, tmp = setup
    out = tmp / "interrupted"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed before the manifest")

    monkeypatch.setattr(shard_builder, "write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        build_shards(cfg, records, clf, unet, out, log=lambda *_: None)
    assert not out.exists() and list(tmp.glob("interrupted.partial-*"))
    with pytest.raises(ShardError, match="interrupted build"):
        read_manifest(out)
    monkeypatch.undo()
    manifest = build_shards(cfg, records, clf, unet, out, log=lambda *_: None)
    assert manifest["counts"]["written"] == len(records) - 1
    assert not list(tmp.glob("interrupted.partial-*"))


def test_a_tampered_shard_is_refused(setup, ray_session, tmp_path):
    cfg, records, clf, unet, tmp = setup
    out = tmp / "build"
    build_shards(cfg, records, clf, unet, out, log=lambda *_: None)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    victim = next(copy.glob("*.parquet"))
    victim.write_bytes(victim.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ShardError, match="checksum"):
        read_manifest(copy)
    with pytest.raises(ShardError, match="checksum"):
        shard_files(copy)


def test_context_swap_shards_do_not_depend_on_batching(setup, ray_session):
    cfg, records, clf, unet, tmp = setup
    from cycle.config import load_config
    from cycle.data.shards import decode_png

    swap = load_config(
        None,
        [
            f"output_dir={tmp}",
            "data.image_size=48",
            "enhance.mode=context_swap",
            "enhance.strength=1.0",
        ],
    )
    build_shards(swap, records, clf, unet, tmp / "swap", batch_size=8, log=lambda *_: None)
    films = ok_films(tmp / "swap")
    worker = EnhanceWorker.from_config(str(clf), str(unet), swap)
    reference = {
        p: png
        for b in enhance_inprocess(swap, records, worker, batch_size=13)
        for p, png, s in zip(b["path"], b["image"], b["status"])
        if s == "ok"
    }
    assert films.keys() == reference.keys()
    for path, (_, film, donor) in films.items():
        np.testing.assert_array_equal(film, decode_png(reference[path]))
        assert donor != path
    # the broken file is somebody's donor: that film keeps its own context, the rest are swapped
    assert sum(not donor for _, _, donor in films.values()) == 1
