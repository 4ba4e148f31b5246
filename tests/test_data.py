import io
import pickle
import shutil
import tarfile
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tune_cnn.data as data_module
import tune_cnn.data.image_folder as image_folder_module
from tune_cnn.data import load_data, stratified_split, stratified_subset
from tune_cnn.errors import DataError

from conftest import make_image_folder


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def test_image_folder_loads_with_a_stratified_validation_split(image_folder, cache):
    data = load_data(image_folder, cache_dir=cache, val_fraction=0.2)
    assert data.classes == ("cat", "dog", "frog")
    assert data.train.x.dtype == np.uint8 and data.train.x.shape[1:] == (3, 20, 20)
    assert len(data.train) == 24 and len(data.val) == 6 and len(data.test) == 12
    assert np.bincount(data.val.y).tolist() == [2, 2, 2]
    assert np.bincount(data.test.y).tolist() == [4, 4, 4]
    expected_mean = data.train.x.transpose(1, 0, 2, 3).reshape(3, -1).mean(axis=1) / 255
    assert np.allclose(data.mean, expected_mean)


@pytest.mark.parametrize("chunk", [data_module.STATISTICS_CHUNK, 7])  # one chunk, and several with a short last one
def test_channel_statistics_equal_the_float_mean_and_std(monkeypatch, chunk):
    monkeypatch.setattr(data_module, "STATISTICS_CHUNK", chunk)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(50, 3, 8, 8), dtype=np.uint8)
    x[:, 2] = 7  # a constant channel: its std is floored, so normalising never divides by 0
    mean, std = data_module.channel_statistics(x)
    flat = x.transpose(1, 0, 2, 3).reshape(3, -1).astype(np.float64) / 255
    assert np.allclose(mean, flat.mean(axis=1), rtol=0, atol=1e-12)
    assert np.allclose(std[:2], flat[:2].std(axis=1), rtol=0, atol=1e-12) and std[2] == 1e-6


def test_pixels_and_labels_match_the_files(image_folder, cache):
    data = load_data(image_folder, cache_dir=cache)
    pixels = np.asarray(Image.open(image_folder / "test" / "dog" / "0000.png")).transpose(2, 0, 1)
    first_dog = np.flatnonzero(data.test.y == 1)[0]
    assert np.array_equal(data.test.x[first_dog], pixels)


def test_validation_split_depends_on_the_seed_only(image_folder, cache):
    a, b, c = (load_data(image_folder, cache_dir=cache, seed=s) for s in (1, 1, 2))
    assert np.array_equal(a.val.x, b.val.x)
    assert not np.array_equal(a.val.x, c.val.x)


def test_grayscale_jpeg_and_a_val_folder(tmp_path, cache):
    root = make_image_folder(tmp_path / "gray", mode="L", suffix=".jpg", splits=("train", "val", "test"))
    data = load_data(root, cache_dir=cache)
    assert data.shape.channels == 1 and len(data.mean) == 1
    assert len(data.val) == 9 and len(data.train) == 30


def test_grayscale_splits_beside_an_rgb_split_become_rgb(tmp_path, cache):
    root = make_image_folder(tmp_path / "mixed", mode="L", splits=("train",))
    make_image_folder(root, mode="RGB", splits=("test",))
    data = load_data(root, cache_dir=cache)
    assert data.shape.channels == 3 and len(data.mean) == 3
    gray = np.asarray(Image.open(root / "train" / "cat" / "0000.png"))
    assert any(all(np.array_equal(image[c], gray) for c in range(3)) for image in np.concatenate([data.train.x, data.val.x]))


def test_subset_is_stratified():
    labels = np.repeat(np.arange(4), [100, 100, 50, 50])
    index = stratified_subset(labels, 60, seed=0)
    assert np.bincount(labels[index]).tolist() == [20, 20, 10, 10]
    rare = np.array([0] * 8 + [1, 2])  # proportions alone would give class 0 all three places
    assert np.bincount(labels[stratified_subset(labels, 4, seed=0)]).tolist() == [1, 1, 1, 1]
    assert np.bincount(rare[stratified_subset(rare, 3, seed=0)]).tolist() == [1, 1, 1]
    held, kept = stratified_split(labels, 0.1, seed=0)
    assert np.bincount(labels[held]).tolist() == [10, 10, 5, 5]
    assert len(np.intersect1d(held, kept)) == 0 and len(held) + len(kept) == len(labels)


def test_second_load_reads_the_cache_without_decoding(image_folder, cache, monkeypatch):
    first = load_data(image_folder, cache_dir=cache)
    monkeypatch.setattr(image_folder_module, "decode_split", lambda *a: pytest.fail("decoded twice"))
    second = load_data(image_folder, cache_dir=cache)
    assert np.array_equal(first.train.x, second.train.x)


def write_cifar_batches(folder: Path, per_batch: int = 20) -> dict[str, np.ndarray]:
    """A small data set in the official cifar-10-batches-py pickle format (bytes keys, protocol 2)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in ("data_batch_1", "data_batch_2", "test_batch"):
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8), b"labels": [i % 10 for i in range(per_batch)]}
        written[name] = batch[b"data"]
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    names = [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f, protocol=2)
    return written


def test_official_pickle_format(tmp_path, cache):
    written = write_cifar_batches(tmp_path / "cifar-10-batches-py")
    data = load_data(tmp_path / "cifar-10-batches-py", cache_dir=cache, val_fraction=0.25)
    assert data.classes[0] == "airplane" and len(data.classes) == 10
    assert len(data.train) + len(data.val) == 40 and len(data.test) == 20
    assert np.array_equal(data.test.x, written["test_batch"].reshape(-1, 3, 32, 32))


def test_a_damaged_batches_folder_is_one_line(tmp_path, cache):
    write_cifar_batches(tmp_path / "meta")
    with open(tmp_path / "meta" / "batches.meta", "wb") as f:
        pickle.dump({b"num_cases_per_batch": 10}, f, protocol=2)
    assert "batches.meta has no label_names list" in one_line_error(tmp_path / "meta", cache)
    write_cifar_batches(tmp_path / "short")
    with open(tmp_path / "short" / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros(100, dtype=np.uint8), b"labels": [0]}, f, protocol=2)
    assert "test_batch is not a CIFAR-10 batch file (its data or labels: cannot reshape" in one_line_error(tmp_path / "short", cache)


def test_pickle_that_would_run_code_is_refused(tmp_path, cache):
    write_cifar_batches(tmp_path / "evil")
    with open(tmp_path / "evil" / "test_batch", "wb") as f:
        pickle.dump({b"data": shutil.rmtree}, f)
    with pytest.raises(DataError, match="is not a CIFAR-10 batch file"):
        load_data(tmp_path / "evil", cache_dir=cache)


def make_archive(source: Path, target: Path) -> Path:
    if target.suffix == ".zip":
        with zipfile.ZipFile(target, "w") as z:
            for path in source.rglob("*"):
                z.write(path, path.relative_to(source.parent))
    else:
        with tarfile.open(target, "w" if target.suffix == ".tar" else "w:gz") as t:
            t.add(source, arcname=source.name)
    return target


@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz", ".tar", ".zip"])
def test_archives_of_an_image_folder_extract_once_by_content(tmp_path, cache, suffix):
    folder = make_image_folder(tmp_path / "images")
    archive = make_archive(folder, tmp_path / f"images{suffix}")
    data = load_data(archive, cache_dir=cache)
    assert len(data.test) == 12
    renamed = archive.rename(tmp_path / f"renamed{suffix}")
    assert np.array_equal(load_data(renamed, cache_dir=cache).train.x, data.train.x)
    assert len([p for p in (cache / "extracted").iterdir() if p.is_dir()]) == 1


def test_images_in_subfolders_of_a_class_folder_load_as_torchvision_finds_them(tmp_path, cache):
    from torchvision.datasets import ImageFolder

    root = make_image_folder(tmp_path / "nested")
    flat_test = load_data(root, cache_dir=cache).test
    for split in ("train", "test"):
        cat = root / split / "cat"
        images = sorted(cat.iterdir())[:3]
        (cat / "indoor" / "sofa").mkdir(parents=True)
        for index, image in enumerate(images):
            image.rename(cat / ("indoor/sofa" if index % 2 else "indoor") / image.name)
    counted = {split: len(ImageFolder(str(root / split))) for split in ("train", "test")}
    hidden = root / "train" / "dog" / ".thumbnails"
    hidden.mkdir()
    Image.new("RGB", (20, 20)).save(hidden / "0000.png")  # a hidden folder's image, which ImageFolder would count
    data = load_data(root, cache_dir=cache)
    assert (len(data.train) + len(data.val), len(data.test)) == (counted["train"], counted["test"]) == (30, 12)
    moved = [p.relative_to(root / "test" / "cat").as_posix() for p in image_folder_module.class_images(root / "test" / "cat")]
    assert moved == ["0003.png", "indoor/0000.png", "indoor/0002.png", "indoor/sofa/0001.png"]  # the order of their paths
    cats = np.sort(flat_test.x[flat_test.y == 0].reshape(4, -1), axis=0)
    assert np.array_equal(np.sort(data.test.x[data.test.y == 0].reshape(4, -1), axis=0), cats)


def test_an_archive_made_by_macos_finder_loads(tmp_path, cache, capsys):
    folder = make_image_folder(tmp_path / "images")
    archive = make_archive(folder, tmp_path / "images.zip")
    with zipfile.ZipFile(archive, "a") as z:  # what Finder's Compress adds: resource forks beside every file
        z.writestr("__MACOSX/images/train/cat/._0000.png", b"\x00\x05\x16\x07 resource fork")
        z.writestr("images/train/cat/._0000.png", b"\x00\x05\x16\x07 resource fork")
    assert len(load_data(archive, cache_dir=cache).train) == 27
    out = capsys.readouterr().out  # the first load says what it does
    assert f"extracting {archive} into {cache / 'extracted'}" in out and "decoding 42 images from " in out


def test_errors_inside_an_archive_name_the_archive_and_a_failed_extraction_leaves_nothing(tmp_path, cache):
    (tmp_path / "flat" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "cat" / "0.png")
    message = one_line_error(make_archive(tmp_path / "flat", tmp_path / "flat.zip"), cache)
    assert message.startswith(f"{tmp_path / 'flat.zip'} is neither an image folder") and str(cache) not in message
    (tmp_path / "cut.tar.gz").write_bytes(make_archive(tmp_path / "flat", tmp_path / "whole.tar.gz").read_bytes()[:60])
    assert "not a readable archive" in one_line_error(tmp_path / "cut.tar.gz", cache)
    assert not list((cache / "extracted").glob("*.partial"))


def test_sixteen_bit_grayscale_keeps_its_top_eight_bits(tmp_path, cache):
    root = make_image_folder(tmp_path / "deep", mode="L")
    for path in root.rglob("*.png"):  # the same images at 16 bits: value v becomes v * 257
        Image.fromarray(np.asarray(Image.open(path)).astype(np.uint16) * 257).save(path)
    assert Image.open(root / "train" / "cat" / "0000.png").mode.startswith("I")
    data = load_data(root, cache_dir=cache)
    eight_bit = load_data(make_image_folder(tmp_path / "plain", mode="L"), cache_dir=cache)
    assert data.shape.channels == 1 and np.array_equal(data.train.x, eight_bit.train.x)  # (PIL's convert made them all 255)


def test_one_class_a_link_to_nothing_and_an_unwritable_cache_are_one_line_each(image_folder, tmp_path, cache):
    one = make_image_folder(tmp_path / "one", classes=("cat",))
    assert "has one class (cat); a classifier needs two or more class folders" in one_line_error(one, cache)
    (image_folder / "train" / "cat" / "9999.png").symlink_to(tmp_path / "gone.png")
    assert f"{image_folder / 'train' / 'cat' / '9999.png'} is a link to nothing" in one_line_error(image_folder, cache)
    (image_folder / "train" / "cat" / "9999.png").unlink()
    assert "cache folder /proc/cache/decoded cannot be written" in one_line_error(image_folder, Path("/proc/cache"))


def test_archive_of_the_pickle_format(tmp_path, cache):
    write_cifar_batches(tmp_path / "cifar-10-batches-py")
    archive = make_archive(tmp_path / "cifar-10-batches-py", tmp_path / "cifar.tar.gz")
    assert len(load_data(archive, cache_dir=cache).test) == 20


def one_line_error(path, cache, **kwargs) -> str:
    with pytest.raises(DataError) as error:
        load_data(path, cache_dir=cache, **kwargs)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_missing_path(tmp_path, cache):
    message = one_line_error(tmp_path / "nowhere", cache)
    assert "does not exist" in message and "nowhere" in message and "--data" in message


def test_empty_folder(tmp_path, cache):
    (tmp_path / "empty").mkdir()
    assert "is empty" in one_line_error(tmp_path / "empty", cache)


def test_a_small_data_set_holds_out_one_image_per_class_and_a_single_one_none(tmp_path, cache):
    small = load_data(make_image_folder(tmp_path / "few", per_class={"train": 4, "test": 2}), cache_dir=cache)  # 10% of 4 rounds to 0
    assert np.bincount(small.val.y).tolist() == [1, 1, 1] and np.bincount(small.train.y).tolist() == [3, 3, 3]
    single = make_image_folder(tmp_path / "single", per_class={"train": 1, "test": 1})
    assert "one training image per class leaves none to hold out for validation; add images or a val/ folder" in one_line_error(single, cache)


def test_class_folder_without_images(image_folder, cache):
    (image_folder / "train" / "bird").mkdir()
    assert "train/bird has no images (.bmp, .jpeg, .jpg, .png, .tif, .tiff, .webp)" in one_line_error(image_folder, cache)


def test_corrupt_image_is_named(image_folder, cache):
    (image_folder / "train" / "dog" / "0003.png").write_bytes(b"not a png at all")
    message = one_line_error(image_folder, cache)
    assert "cannot read image" in message and "dog/0003.png" in message


def test_mixed_image_sizes(image_folder, cache):
    Image.new("RGB", (24, 20)).save(image_folder / "train" / "cat" / "0001.png")
    message = one_line_error(image_folder, cache)
    assert "image sizes differ" in message and "24x20" in message


def test_test_classes_must_match_train(image_folder, cache):
    shutil.rmtree(image_folder / "test" / "frog")
    assert "classes differ from train: missing ['frog']" in one_line_error(image_folder, cache)


def test_a_file_that_is_not_an_archive(tmp_path, cache):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.tar.gz").write_bytes(b"garbage")
    assert "not an archive" in one_line_error(tmp_path / "notes.txt", cache)
    assert "not a readable archive" in one_line_error(tmp_path / "broken.tar.gz", cache)


def test_archive_members_cannot_escape_the_cache(tmp_path, cache):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("../escaped.txt", "x")
    assert "unsafe path '../escaped.txt'" in one_line_error(archive, cache)
    assert not (cache / "extracted" / "escaped.txt").exists() and not (cache / "escaped.txt").exists()


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_an_archive_that_would_extract_far_beyond_its_size_is_refused_before_anything_is_written(tmp_path, cache, suffix):
    """A 64 MiB member of zeros packs into about 64 KiB (1000x): over the 200x limit, as a zip bomb is."""
    zeros, archive = bytes(64 * 2**20), tmp_path / f"bomb{suffix}"
    if suffix == ".zip":
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr("train/cat/0.png", zeros)
    else:
        with tarfile.open(archive, "w:gz") as tar:
            info = tarfile.TarInfo("train/cat/0.png")
            info.size = len(zeros)
            tar.addfile(info, io.BytesIO(zeros))
    message = one_line_error(archive, cache)
    assert f"{archive} would extract to 64.0 MiB, over tune_cnn's limit of" in message and "it may be an archive bomb" in message
    assert [p.name for p in (cache / "extracted").iterdir() if not p.name.endswith(".lock")] == []


def test_failed_download_says_offline_and_how_to_point_at_a_copy(cache, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    message = one_line_error("cifar10", cache)
    assert "offline" in message and "--data" in message


def test_shared_cifar10_copy_loads_in_full(cifar_archive):
    data = load_data(cifar_archive)
    assert (len(data.train), len(data.val), len(data.test)) == (45_000, 5_000, 10_000)
    assert data.classes == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    assert np.bincount(data.test.y).tolist() == [1000] * 10


def test_an_empty_environment_variable_means_its_default(monkeypatch):
    """`TUNE_CNN_CACHE=` once made the current folder the cache; empty now reads as unset, as XDG's variables do."""
    monkeypatch.setenv("TUNE_CNN_CACHE", "")
    monkeypatch.setenv("TUNE_CNN_DATA", "")
    assert data_module.default_cache_dir() == Path.home() / ".cache" / "tune_cnn"
    assert data_module.default_source() == "cifar10"
    monkeypatch.setenv("TUNE_CNN_CACHE", "/somewhere/else")
    assert data_module.default_cache_dir() == Path("/somewhere/else")
