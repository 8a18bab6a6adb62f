"""The OMERO password stays secret: not in logs, reprs, errors, results or settings dumps."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

pytest.importorskip("omero")

from tests.omero.helpers import DEVICE, settings_for, unique_manifest
from tilebridge_protocol.errors import PermanentError, TransientError
from tilebridge_runtime.secrets import masked_json
from tilebridge_storage.omero_backend.backend import OmeroBackend
from tilebridge_storage.omero_backend.settings import Credentials, DevicePolicy, OmeroSettings
from tilebridge_storage.testing.manifests import make_tiles

WRONG = "wrong-Secret-4711"


def password_file(tmp_path: Path, secret: str, mode: int = 0o600) -> Path:
    path = tmp_path / "omero.password"
    path.write_text(secret + "\n")
    path.chmod(mode)
    return path


def everything_logged(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> str:
    out, err = capfd.readouterr()
    records = [f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records]
    # exc_text is filled by formatters only; format the tracebacks ourselves
    for r in caplog.records:
        if r.exc_info:
            records.append(logging.Formatter().formatException(r.exc_info))
    return "\n".join([*records, out, err])


def test_password_never_shows_in_logs_reprs_errors_or_results(
    omero_target: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = omero_target.password
    settings = settings_for(
        omero_target, password=None, password_file=password_file(tmp_path, secret)
    )
    backend = OmeroBackend(settings)
    seen: list[str] = [repr(settings), str(settings), settings.model_dump_json(), repr(backend)]
    seen.append(masked_json(settings))
    try:
        manifest = unique_manifest()
        tiles = make_tiles(manifest)
        writer = backend.open_image(DEVICE, manifest)
        seen.append(repr(writer))
        for key in manifest.tile_keys():
            writer.write_tile(key, tiles[key])
        stored = writer.finish()
        seen += [repr(stored), stored.location, str(stored.ids)]
        seen += [repr(s) for s in backend.pool._sessions.values()]

        wrong = OmeroBackend(settings_for(omero_target, password=WRONG))
        with pytest.raises(PermanentError) as refused:
            wrong.open_image(DEVICE, unique_manifest())
        seen += [str(refused.value), repr(refused.value), repr(wrong.settings)]

        if omero_target.server is not None:
            omero_target.server.stop()
            with pytest.raises(TransientError) as down:
                OmeroBackend(settings).open_image(DEVICE, unique_manifest())
            seen.append(str(down.value))
            omero_target.server.start()
    finally:
        backend.close()
    seen.append(everything_logged(caplog, capfd))
    text = "\n".join(seen)
    assert "login refused" in text  # the failures were logged/raised ...
    assert secret not in text  # ... without the password
    assert WRONG not in text


def test_password_file_is_read_at_login_and_a_missing_one_is_named(
    omero_target: Any, tmp_path: Path
) -> None:
    path = tmp_path / "absent.password"
    backend = OmeroBackend(settings_for(omero_target, password=None, password_file=path))
    with pytest.raises(PermanentError, match=f"cannot read the OMERO password file {path}"):
        backend.open_image(DEVICE, unique_manifest())
    # written later (e.g. a rotated secret): the next login reads it
    password_file(tmp_path, omero_target.password).rename(path)
    try:
        writer = backend.open_image(DEVICE, unique_manifest())
        writer.abort()
    finally:
        backend.close()


def test_a_password_file_others_can_read_is_warned_about_by_path_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = password_file(tmp_path, "s3cret-value", mode=0o644)
    creds = Credentials(username="u", password_file=path)
    assert creds.secret() == "s3cret-value"
    [record] = [r for r in caplog.records if "password file" in r.getMessage()]
    assert str(path) in record.getMessage()
    assert "s3cret-value" not in record.getMessage()


def test_settings_take_exactly_one_password_source(tmp_path: Path) -> None:
    base = {"host": "omero.example.org", "username": "ingest"}
    with pytest.raises(ValidationError, match="give password or password_file"):
        OmeroSettings(**base)
    with pytest.raises(ValidationError, match="give password or password_file"):
        OmeroSettings(**base, password="a", password_file=tmp_path / "p")
    with pytest.raises(ValidationError, match="needs a policy username"):
        DevicePolicy(password="a")
    with pytest.raises(ValidationError, match="give password or password_file"):
        DevicePolicy(username="scope-user")
    with pytest.raises(ValidationError, match="Extra inputs"):
        OmeroSettings(**base, password="a", pasword="typo")


def test_ingest_settings_read_the_password_from_the_environment_masked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from server_ingest.settings import IngestSettings

    monkeypatch.setenv("TILEBRIDGE_INGEST_OMERO__HOST", "omero.example.org")
    monkeypatch.setenv("TILEBRIDGE_INGEST_OMERO__USERNAME", "ingest")
    monkeypatch.setenv("TILEBRIDGE_INGEST_OMERO__PASSWORD", "env-Secret-99")
    settings = IngestSettings(data_dir=tmp_path)
    assert settings.omero is not None
    assert settings.omero.password == SecretStr("env-Secret-99")
    assert settings.omero.credentials.secret() == "env-Secret-99"
    for shown in (repr(settings), str(settings.omero), masked_json(settings)):
        assert "env-Secret-99" not in shown


def test_a_device_policy_writes_with_its_own_account(omero_target: Any, tmp_path: Path) -> None:
    """Per-device credentials: the images belong to the device's OMERO user."""
    server = omero_target.server
    if server is None:
        pytest.skip("needs a second OMERO user (the stand-in makes one)")
    from tests.omero_standin.sessions import User

    user = server.add_user(User("scope-user", "scope-Secret-1", "scopes"))
    policy = DevicePolicy(
        username="scope-user",
        password_file=password_file(tmp_path, "scope-Secret-1"),
        may_create=True,
        may_create_project=True,
    )
    backend = OmeroBackend(settings_for(omero_target, devices={DEVICE: policy}))
    try:
        manifest = unique_manifest()
        tiles = make_tiles(manifest)
        writer = backend.open_image(DEVICE, manifest)
        for key in manifest.tile_keys():
            writer.write_tile(key, tiles[key])
        stored = writer.finish()
    finally:
        backend.close()
    image = server.image(stored.ids["image"])
    assert image.details.owner.id.val == user.id
    assert [s.user.name for s in server.sessions.all()] == ["scope-user"]
