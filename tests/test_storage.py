"""Storage writes are atomic, and an object store gets each file as one plain PUT (no temp key + move)."""
import pytest

from ray_mtt.core.storage import open_storage


class RecordingFs:
    """pyarrow filesystem calls, forwarded and recorded by name."""

    def __init__(self, fs):
        self._fs, self.calls = fs, []

    def __getattr__(self, name):
        attr = getattr(self._fs, name)
        if not callable(attr):
            return attr

        def recorded(*args, **kwargs):
            self.calls.append((name, args[0] if args else None))
            return attr(*args, **kwargs)
        return recorded


@pytest.fixture
def s3(monkeypatch):
    pytest.importorskip("moto")
    from tests.cluster_bed import S3Endpoint
    endpoint = S3Endpoint()
    for key, value in endpoint.env.items():
        monkeypatch.setenv(key, value)
    yield endpoint
    endpoint.stop()


def test_s3_writes_are_single_puts_of_the_final_key(s3):
    from tests.cluster_bed import BUCKET
    storage = open_storage(f"s3://{BUCKET}/store")
    storage.fs = RecordingFs(storage.fs)
    storage.write("expert_0000.partial/epoch_001.npy", b"row")
    storage.write("expert_0000.json", b"{}")
    assert [name for name, _ in storage.fs.calls] == ["open_output_stream", "open_output_stream"]
    assert [path for _, path in storage.fs.calls] == [f"{BUCKET}/store/expert_0000.partial/epoch_001.npy",
                                                       f"{BUCKET}/store/expert_0000.json"]
    assert s3.keys() == ["store/expert_0000.json", "store/expert_0000.partial/epoch_001.npy"]  # no temp key left
    assert storage.read("expert_0000.partial/epoch_001.npy") == b"row"


def test_a_shared_filesystem_uri_still_writes_a_temp_file_and_renames_it(tmp_path):
    storage = open_storage(tmp_path.as_uri())
    storage.fs = RecordingFs(storage.fs)
    storage.write("a/b.npy", b"data")
    names = [name for name, _ in storage.fs.calls]
    assert names == ["create_dir", "open_output_stream", "move"]
    assert (tmp_path / "a" / "b.npy").read_bytes() == b"data" and [p.name for p in (tmp_path / "a").iterdir()] == ["b.npy"]
