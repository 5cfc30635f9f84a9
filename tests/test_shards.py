import shutil

import numpy as np
import pytest
import torch

import cycle.shard_builder as shard_builder
from cycle.checkpoint import save_classifier
from cycle.config import load_config
from cycle.data.records import records_of, scan
from cycle.data.shards import ShardError, load_shards, read_manifest, read_shards_ray
from cycle.lungseg.masks import save_lung_model
from cycle.lungseg.unet import build_unet
from cycle.models import build_model
from cycle.shard_builder import EnhanceWorker, build_shards, enhance_inprocess

pytestmark = pytest.mark.ray


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
    shard_records, films, _ = load_shards(out)
    worker = EnhanceWorker.from_config(str(clf), str(unet), cfg)
    reference = {}
    for batch in enhance_inprocess(cfg, records, worker, batch_size=16):
        for path, png, status in zip(batch["path"], batch["image"], batch["status"]):
            if status == "ok":
                reference[path] = png
    assert len(shard_records) == len(reference) == len(records) - 1
    from cycle.data.shards import decode_png

    for record, film in zip(shard_records, films):
        np.testing.assert_array_equal(film, decode_png(reference[record.path]))
        assert film.shape == (55, 55)  # R = round(48 / 0.875): the pre-crop geometry
    # The in-process training view: same crop and normalisation as original films.
    from cycle.data.dataset import ImageDataset
    from cycle.data.transforms import preprocess_from_config

    pre = preprocess_from_config(cfg.data)
    dataset = ImageDataset(shard_records, pre, resized=films)
    tensor, label, _ = dataset[3]
    torch.testing.assert_close(tensor, pre.normalise(pre.crop(films[3])))
    assert label == shard_records[3].label
    ds = read_shards_ray(out)
    batch = next(iter(ds.iter_batches(batch_size=8, batch_format="numpy")))
    assert batch["image"].shape[1:] == (55, 55) and batch["image"].dtype == np.uint8
    # The in-process writer (used inside Tune trials) writes the same rows and the same manifest
    # counts.
    manifest = build_shards(
        cfg, records, clf, unet, tmp / "inprocess", inprocess=True, log=lambda *_: None
    )
    assert manifest["counts"] == read_manifest(out)["counts"]
    same_records, same_films, _ = load_shards(tmp / "inprocess")
    by_path = dict(zip((r.path for r in same_records), same_films))
    for record, film in zip(shard_records, films):
        np.testing.assert_array_equal(by_path[record.path], film)


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
        load_shards(copy)


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
    shard_records, films, stats = load_shards(tmp / "swap")
    worker = EnhanceWorker.from_config(str(clf), str(unet), swap)
    reference = {
        p: png
        for b in enhance_inprocess(swap, records, worker, batch_size=13)
        for p, png, s in zip(b["path"], b["image"], b["status"])
        if s == "ok"
    }
    for record, film, stat in zip(shard_records, films, stats):
        np.testing.assert_array_equal(film, decode_png(reference[record.path]))
        assert stat["donor"] != record.path
    # the broken file is somebody's donor: that film keeps its own context, the rest are swapped
    assert sum(not s["donor"] for s in stats) == 1
