"""Model archives: packed as SageMaker packs a model.tar.gz (steps/common/archives.py), read back
with their gzip decompressed by ISA-L, and any other tar archive read as tarfile reads it."""

from __future__ import annotations

import io
import tarfile

import pytest

from steps.common import archives, models
from steps.common.contract import StageError


@pytest.fixture
def folder(tmp_path):
    model = tmp_path / "model"
    (model / "base").mkdir(parents=True)
    (model / "config.json").write_text('{"a": 1}')
    (model / "base" / "weights.bin").write_bytes(bytes(range(256)) * 4096)
    return model


def test_a_packed_model_reads_back_whole_in_one_pass_and_any_gzip_reader_reads_it(folder,
                                                                                   tmp_path):
    packed = tmp_path / "model.tar.gz"
    archives.pack_folder(folder, packed)

    with archives.open_archive(packed) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    assert files == {"base/weights.bin": bytes(range(256)) * 4096,
                     "config.json": b'{"a": 1}'}
    with tarfile.open(packed, "r:gz") as tar:  # the standard library's zlib reads it too
        assert tar.extractfile("config.json").read() == b'{"a": 1}'


@pytest.mark.parametrize("mode", ["w", "w:xz", "w:gz"])
def test_an_archive_packed_elsewhere_extracts_whatever_its_compression(folder, tmp_path, mode):
    packed = tmp_path / "model.tar"
    with tarfile.open(packed, mode) as tar:
        tar.add(folder, arcname=".")

    models.safe_extract(packed, tmp_path / "out")

    assert (tmp_path / "out" / "config.json").read_text() == '{"a": 1}'
    assert (tmp_path / "out" / "base" / "weights.bin").stat().st_size == 256 * 4096


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_a_damaged_archive_is_one_line_naming_it(folder, tmp_path, damage):
    packed = tmp_path / "model.tar.gz"
    archives.pack_folder(folder, packed)
    data = bytearray(packed.read_bytes())
    if damage == "truncated":
        data = data[:len(data) // 2]
    else:  # the deflate stream's bytes, past the gzip header
        data[20:60] = b"\xff" * 40
    packed.write_bytes(bytes(data))

    with pytest.raises(StageError) as raised:
        models.safe_extract(packed, tmp_path / "out")

    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"{packed}: not a readable tar archive (")


def test_a_gzip_package_is_decompressed_once_when_extracted(folder, tmp_path, monkeypatch):
    packed = tmp_path / "model.tar.gz"
    archives.pack_folder(folder, packed)
    read = []
    real_open = archives.igzip.open

    class Counted(io.FileIO):
        def readinto(self, buffer):
            count = super().readinto(buffer)
            read.append(count or 0)
            return count

    monkeypatch.setattr(archives.igzip, "open",
                        lambda path, mode="rb", **kw: real_open(Counted(path), mode, **kw))
    models.safe_extract(packed, tmp_path / "out")

    assert (tmp_path / "out" / "base" / "weights.bin").stat().st_size == 256 * 4096
    # Going back to the start for a second pass would read (and decompress) it all again.
    assert 0 < sum(read) <= packed.stat().st_size


def test_a_refused_archive_leaves_no_staging_folder_nor_the_folders_made_for_it(tmp_path):
    packed = tmp_path / "model.tar"
    with tarfile.open(packed, "w") as tar:
        config = tarfile.TarInfo("config.json")
        config.size = 2
        tar.addfile(config, io.BytesIO(b"{}"))
        escape = tarfile.TarInfo("../evil")
        tar.addfile(escape)
    dest = tmp_path / "made" / "for" / "it"

    with pytest.raises(StageError, match=r"refusing '\.\.' in path '\.\./evil'"):
        models.safe_extract(packed, dest)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.tar"]


def test_extracting_into_a_folder_with_files_keeps_them(folder, tmp_path):
    packed = tmp_path / "model.tar.gz"
    archives.pack_folder(folder, packed)
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "kept.txt").write_text("kept")

    models.safe_extract(packed, dest)

    assert (dest / "kept.txt").read_text() == "kept"
    assert (dest / "config.json").read_text() == '{"a": 1}'
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
