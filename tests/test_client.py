"""serve/client.py without a server: payload shape and the errors a user sees."""

import base64

import pytest

from tests.components import serve_script


@pytest.fixture(scope="module")
def client():
    return serve_script("client")

def test_payload_is_a_dataframe_split_of_base64_files(client, tmp_path):
    image = tmp_path / "a.jpg"
    image.write_bytes(b"\xff\xd8\xffjpeg bytes")
    payload = client.build_payload([image], explain=True)
    assert payload["dataframe_split"]["columns"] == ["image"]
    assert base64.b64decode(payload["dataframe_split"]["data"][0][0]) == image.read_bytes()
    assert payload["params"] == {"explain": True}
    assert "params" not in client.build_payload([image], explain=False)

def test_missing_files_and_an_unreachable_server_are_clear_errors(client, tmp_path, capsys):
    assert client.main(["--url", "http://127.0.0.1:9", str(tmp_path / "missing.jpg")]) == 2
    assert "no such file" in capsys.readouterr().err
    image = tmp_path / "a.jpg"
    image.write_bytes(b"x")
    assert client.main(["--url", "http://127.0.0.1:9", str(image)]) == 1
    assert "cannot reach http://127.0.0.1:9" in capsys.readouterr().err
