import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conceptmon.concept_sets import load_concepts
from conceptmon.concepts import ConceptError, ConceptSet
from conceptmon.config import ProbeConfig
from conceptmon.probes import ProbeError, create_probe, list_probes
from conceptmon.probes.cifar import CIFAR100_FINE_LABELS, CifarProbe, cifar100_concepts
from conceptmon.probes.folder import FolderProbe

from .fixtures_broden import write_tiny_broden


def write_cifar(root: Path, n_train=5, n_test=4, names=CIFAR100_FINE_LABELS, str_keys=False) -> Path:
    """torchvision's cifar-100-python layout; image i of a split has R = i, G = 100 + i, B = 200 + i
    everywhere except pixel (0, 1), which is (1, 2, 3)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)

    def key(k):
        return k if str_keys else k.encode()

    for split, n in (("train", n_train), ("test", n_test)):
        planes = np.zeros((n, 3, 32, 32), dtype=np.uint8)
        for i in range(n):
            planes[i, 0], planes[i, 1], planes[i, 2] = i, 100 + i, 200 + i
            planes[i, :, 0, 1] = (1, 2, 3)
        data = {
            key("data"): planes.reshape(n, 3072),
            key("fine_labels"): [i % 100 for i in range(n)],
            key("coarse_labels"): [0] * n,
            key("filenames"): [f"img_{i}.png".encode() for i in range(n)],
        }
        with open(folder / split, "wb") as f:
            pickle.dump(data, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({key("fine_label_names"): [n.encode() for n in names], key("coarse_label_names"): []}, f, protocol=2)
    return folder


# ----------------------------------------------------------------------------- CIFAR-100


@pytest.mark.parametrize("str_keys", [False, True])
def test_cifar_images_come_from_the_pickled_planes(tmp_path, str_keys):
    write_cifar(tmp_path, str_keys=str_keys)
    probe = CifarProbe(tmp_path)  # the parent of cifar-100-python works too
    assert len(probe) == 4 and probe.split == "test" and probe.concepts is None and not probe.has_masks
    img = probe.load_image(2)
    assert img.mode == "RGB" and img.size == (32, 32)
    assert img.getpixel((5, 7)) == (2, 102, 202)
    assert img.getpixel((1, 0)) == (1, 2, 3)  # (x=1, y=0): row 0, column 1
    assert probe.relpath(3) == "test/000003"
    train = CifarProbe(tmp_path / "cifar-100-python", split="train", limit=3)
    assert len(train) == 3 and train.relpath(0) == "train/000000"
    assert train.fingerprint() != probe.fingerprint()
    assert train.fingerprint() != CifarProbe(tmp_path, split="train").fingerprint()  # limit counts


def test_cifar_fingerprint_follows_content_not_location(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("CONCEPTMON_CACHE", str(tmp_path / "user-cache"))
    write_cifar(tmp_path / "a")
    first = CifarProbe(tmp_path / "a").fingerprint()
    assert CifarProbe(shutil.copytree(tmp_path / "a", tmp_path / "b")).fingerprint() == first
    shutil.rmtree(tmp_path / "a")
    write_cifar(tmp_path / "a", str_keys=True)  # the same images pickled differently: other bytes
    assert CifarProbe(tmp_path / "a").fingerprint() != first


def test_cifar_registry_and_errors(tmp_path):
    assert {"cifar100", "folder"} <= set(list_probes())
    write_cifar(tmp_path)
    probe = create_probe(ProbeConfig(name="cifar100", root=str(tmp_path), split="train", limit=2))
    assert isinstance(probe, CifarProbe) and len(probe) == 2
    with pytest.raises(ProbeError, match=r"probe.split: expected train or test for cifar100, got 'val'"):
        CifarProbe(tmp_path, split="val")
    with pytest.raises(ProbeError, match=r"probe.root: required for probe cifar100"):
        create_probe(ProbeConfig(name="cifar100"))
    with pytest.raises(ProbeError, match=r"nowhere not found; .*CIFAR100\('DIR', download=True\)"):
        CifarProbe(tmp_path / "nowhere")
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"garbage")
    with pytest.raises(ProbeError, match=r"test: not a CIFAR-100 python pickle"):
        CifarProbe(tmp_path)


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (str(self.target),))


def test_cifar_pickle_cannot_run_code(tmp_path):
    folder = write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    with open(folder / "test", "wb") as f:
        pickle.dump({b"data": _Exploit(marker)}, f, protocol=2)
    with pytest.raises(ProbeError, match=r"refusing posix.mkdir|refusing os.mkdir|refusing nt.mkdir"):
        CifarProbe(tmp_path)
    assert not marker.exists()


def test_cifar100_concepts_from_probe_or_builtin(tmp_path):
    builtin = load_concepts("cifar100", None)
    assert len(builtin) == 100 and "aquarium fish" in builtin.names and "aquarium_fish" not in builtin.names
    cats = dict(zip(builtin.names, builtin.categories))
    assert cats["sea"] == "scene" and cats["apple"] == "object"
    names = ("dog_face", "sea") + CIFAR100_FINE_LABELS[2:]
    write_cifar(tmp_path, names=names)
    probe = CifarProbe(tmp_path)
    assert load_concepts("cifar100", probe).names[:2] == ("dog face", "sea")
    assert load_concepts(None, probe).names[:2] == ("dog face", "sea")  # concepts: null uses the class names
    assert cifar100_concepts().names == builtin.names


# ----------------------------------------------------------------------------- folder


def write_folder(root: Path) -> Path:
    (root / "b" / "deep").mkdir(parents=True)
    (root / ".hidden").mkdir()
    Image.new("RGB", (8, 6), (255, 0, 0)).save(root / "b" / "deep" / "z.png")
    Image.new("RGB", (8, 6), (0, 255, 0)).save(root / "a.JPG", quality=95)
    Image.new("L", (5, 5), 128).save(root / "b" / "gray.png")
    Image.new("RGB", (4, 4)).save(root / ".hidden" / "x.png")
    (root / "b" / "broken.jpg").write_text("not an image")
    (root / "notes.txt").write_text("ignored")
    return root


def test_folder_lists_images_sorted_and_reports_unreadable_files(tmp_path):
    root = write_folder(tmp_path / "imgs")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable of 4 image files \(first: b/broken.jpg"):
        probe = FolderProbe(root)
    assert [probe.relpath(i) for i in range(len(probe))] == ["a.JPG", "b/deep/z.png", "b/gray.png"]
    assert probe.unreadable[0][0] == "b/broken.jpg"
    assert probe.load_image(2).mode == "RGB" and probe.load_image(1).getpixel((0, 0)) == (255, 0, 0)
    assert probe.concepts is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        limited = create_probe(ProbeConfig(name="folder", root=str(root), limit=2))
        before = limited.fingerprint()
        assert len(limited) == 2
        os.utime(root / "a.JPG", ns=(1, 1))  # touched, same bytes: same content
        assert FolderProbe(root, limit=2).fingerprint() == before
        (root / "a.JPG").write_bytes((root / "a.JPG").read_bytes() + b"\0")  # one byte more
        assert FolderProbe(root, limit=2).fingerprint() != before


def test_folder_fails_only_when_nothing_is_readable(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "one.png").write_bytes(b"\x89PNG broken")
    (bad / "two.jpg").write_bytes(b"")
    with pytest.raises(ProbeError, match=r"none of the 2 image files under .*bad is readable \(first: one.png"):
        FolderProbe(bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ProbeError, match=r"no image files under .*empty \(looked for .bmp"):
        FolderProbe(empty)
    with pytest.raises(ProbeError, match=r"is not a folder"):
        FolderProbe(tmp_path / "missing")


# ----------------------------------------------------------------------------- concept sets


def test_words_file_concepts_and_relative_paths(tmp_path, monkeypatch):
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / "words.txt").write_text("red\tcolor\n\nwindmill\nred\tobject\n  sky \n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    concepts = load_concepts("words.txt", None, base=cfg_dir)
    assert concepts.names == ("red", "windmill", "sky")
    assert concepts.categories == ("color", "other", "other")
    assert load_concepts(str(cfg_dir / "words.txt"), None) == concepts
    with pytest.raises(ConceptError, match=r"concepts: 'nope.txt' is not synthetic, broden, cifar100 .* no such file \(also looked in"):
        load_concepts("nope.txt", None, base=cfg_dir)


def test_broden_concepts_drop_suffixes_and_merge(tmp_path):
    write_tiny_broden(tmp_path / "broden")
    from conceptmon.probes.broden import BrodenProbe

    probe = BrodenProbe(tmp_path / "broden")
    concepts = load_concepts("broden", probe)
    assert concepts.names == ("red", "blue", "dog", "leg", "wheel", "street", "striped", "purple")
    assert dict(zip(concepts.names, concepts.categories))["street"] == "scene"
    assert load_concepts(f"broden:{tmp_path / 'broden'}", None) == concepts
    assert load_concepts(None, probe).names == concepts.names  # the probe's labels, merged
    with pytest.raises(ConceptError, match=r"concepts: broden reads label.csv from the probe folder, but probe None"):
        load_concepts("broden", None)


def test_synthetic_and_missing_concepts():
    from conceptmon.probes.synthetic import synthetic_concepts

    assert load_concepts("synthetic", None) == synthetic_concepts().merged()
    assert "red" in load_concepts("synthetic", None).names

    class Bare:
        name = "folder"
        concepts = None

    with pytest.raises(ConceptError, match=r"concepts: not set and probe 'folder' has no label names; set concepts: to"):
        load_concepts(None, Bare())
    assert isinstance(load_concepts("synthetic", Bare()), ConceptSet)
