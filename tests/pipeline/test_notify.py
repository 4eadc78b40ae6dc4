"""The stage e-mail against a real SMTP server on loopback (aiosmtpd), in plain, STARTTLS and SSL modes."""
from __future__ import annotations

import datetime as dt
import email
import email.policy
import ipaddress
import logging
import socket
import ssl
from dataclasses import replace
from pathlib import Path

import pytest

from common.config.schema import NotifyConfig
from common.pipeline.notify import human_duration, scrub, send_stage_email

aiosmtpd_controller = pytest.importorskip("aiosmtpd.controller")
from aiosmtpd.smtp import AuthResult, LoginPassword  # noqa: E402

PASSWORD = "s3cr#t-Pa55word!"
ENV = "PLANKTON_TEST_SMTP_PASSWORD"


class Recorder:
    """aiosmtpd handler and authenticator that keeps what it sees."""

    def __init__(self, accept_login: bool = True) -> None:
        self.messages: list[email.message.EmailMessage] = []
        self.envelopes = []
        self.logins: list[tuple[str, str]] = []
        self.accept_login = accept_login

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd hook name
        self.envelopes.append(envelope)
        self.messages.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
        return "250 OK"

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        if isinstance(auth_data, LoginPassword):
            self.logins.append((auth_data.login.decode(), auth_data.password.decode()))
        ok = self.accept_login and self.logins[-1:] == [("mailer", PASSWORD)]
        return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd answers 535 itself


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 (the client trusts it through SSL_CERT_FILE)."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    d = tmp_path_factory.mktemp("tls")
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return d / "cert.pem", d / "key.pem"


@pytest.fixture
def smtp_server(request):
    """Start a loopback aiosmtpd server: ``start(**smtp_kwargs) -> (recorder, port)``."""
    controllers = []

    def start(recorder: Recorder | None = None, **kwargs):
        recorder = recorder or Recorder()
        port = free_port()
        if "authenticator" in kwargs and kwargs["authenticator"] is True:
            kwargs["authenticator"] = recorder.authenticate
        c = aiosmtpd_controller.Controller(recorder, hostname="127.0.0.1", port=port, ready_timeout=5, **kwargs)
        c.start()
        controllers.append(c)
        return recorder, port

    yield start
    for c in controllers:
        c.stop()


def server_tls_context(tls_files) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*tls_files)
    return ctx


def make_cfg(port: int, **kw) -> NotifyConfig:
    base = dict(enabled=True, smtp_host="127.0.0.1", smtp_port=port, security="plain",
                sender="plankton@lab.example", recipients=["a@lab.example", "b@lab.example"],
                timeout=3.0, log_lines=5, password_env=ENV)
    base.update(kw)
    return NotifyConfig(**base)


def make_info(tmp_path: Path, **kw) -> dict:
    log_path = tmp_path / "03_main_supcon" / "log.txt"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("".join(f"log line {i}\n" for i in range(30)))
    tb = "Traceback (most recent call last):\n" + "".join(f'  File "x.py", line {i}, in f{i}\n' for i in range(20))
    tb += "RuntimeError: CUDA out of memory\n"
    info = dict(stage="03_main_supcon", run_dir="runs/dyb", host="gpu01", elapsed_s=7384.0,
                error="RuntimeError: CUDA out of memory", traceback=tb, log_path=str(log_path),
                exit_code=1, metrics=None)
    info.update(kw)
    return info


def body_of(msg) -> str:
    return msg.get_body(("plain",)).get_content()


def test_failure_email_plain_content(smtp_server, tmp_path, caplog):
    rec, port = smtp_server()
    info = make_info(tmp_path)
    with caplog.at_level(logging.INFO, logger="common.pipeline.notify"):
        assert send_stage_email(make_cfg(port), "failure", info) is True
    assert len(rec.messages) == 1
    msg = rec.messages[0]
    assert msg["Subject"] == "[plankton] FAILED 03_main_supcon on gpu01 (run runs/dyb)"
    assert msg["From"] == "plankton@lab.example"
    assert sorted(rec.envelopes[0].rcpt_tos) == ["a@lab.example", "b@lab.example"]
    body = body_of(msg)
    assert "03_main_supcon" in body and "runs/dyb" in body and "gpu01" in body
    assert "2 h 03 min" in body  # 7384 s
    assert "Exit code: 1" in body
    assert "Error:     RuntimeError: CUDA out of memory" in body
    assert info["log_path"] in body
    # the last log_lines (5) lines of the traceback, not the earlier ones
    assert "Traceback (last 5 lines):" in body
    assert 'line 16, in f16' in body and "RuntimeError: CUDA out of memory" in body.splitlines()[-1]
    assert 'line 15, in f15' not in body
    assert "sent the failure e-mail" in caplog.text


def test_success_email_only_when_switched_on(smtp_server, tmp_path):
    rec, port = smtp_server()
    info = make_info(tmp_path, error=None, traceback=None, exit_code=0,
                     metrics={"best_val_macro_f1": 0.8123456789, "epochs": 100, "per_class": [1, 2]})
    assert send_stage_email(make_cfg(port), "success", info) is False  # on_success defaults to off
    assert send_stage_email(make_cfg(port, enabled=False, on_failure=True), "failure", info) is False
    assert send_stage_email(make_cfg(port, on_failure=False), "failure", info) is False
    assert rec.messages == []
    assert send_stage_email(make_cfg(port, on_success=True), "success", info) is True
    msg = rec.messages[0]
    assert msg["Subject"].startswith("[plankton] FINISHED 03_main_supcon")
    body = body_of(msg)
    assert "best_val_macro_f1: 0.812346" in body and "epochs: 100" in body and "per_class: [1, 2]" in body
    assert "Error:" not in body
    assert "log line 29" in body and "log line 24" not in body  # no traceback: the log's tail instead


def test_interrupt_email(smtp_server, tmp_path):
    rec, port = smtp_server()
    info = make_info(tmp_path, error="interrupted (Ctrl-C)", traceback=None, exit_code=130, elapsed_s=65.2)
    assert send_stage_email(make_cfg(port), "interrupt", info) is True
    body = body_of(rec.messages[0])
    assert rec.messages[0]["Subject"].startswith("[plankton] INTERRUPTED")
    assert "interrupted (Ctrl-C)" in body and "1 min 05 s" in body and "130" in body


def test_login_over_plain_and_password_never_leaks(smtp_server, tmp_path, caplog, monkeypatch):
    rec, port = smtp_server(authenticator=True, auth_require_tls=False)
    monkeypatch.setenv(ENV, PASSWORD)
    # the program printed the password into its error and traceback
    info = make_info(tmp_path, error=f"ValueError: bad login {PASSWORD}",
                     traceback=f"Traceback:\n  ...\nValueError: bad login {PASSWORD}\n")
    with caplog.at_level(logging.DEBUG, logger="common.pipeline.notify"):
        assert send_stage_email(make_cfg(port, user="mailer", allow_insecure_login=True), "failure", info) is True
    assert rec.logins == [("mailer", PASSWORD)]
    raw = rec.envelopes[0].content.decode("utf-8", errors="replace")
    body = body_of(rec.messages[0])
    assert PASSWORD not in raw and PASSWORD not in body
    assert "bad login ***" in body
    assert PASSWORD not in caplog.text


def test_rejected_login_is_logged_without_password(smtp_server, tmp_path, caplog, monkeypatch):
    rec, port = smtp_server(Recorder(accept_login=False), authenticator=True, auth_require_tls=False)
    monkeypatch.setenv(ENV, PASSWORD)
    with caplog.at_level(logging.DEBUG, logger="common.pipeline.notify"):
        assert send_stage_email(make_cfg(port, user="mailer", allow_insecure_login=True), "failure",
                                make_info(tmp_path)) is False
    assert rec.messages == [] and set(rec.logins) == {("mailer", PASSWORD)}  # smtplib tries PLAIN, then LOGIN
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and "SMTPAuthenticationError" in errors[0].getMessage()
    assert PASSWORD not in caplog.text


def test_missing_password_variable_sends_nothing(smtp_server, tmp_path, caplog, monkeypatch):
    rec, port = smtp_server(authenticator=True, auth_require_tls=False)
    monkeypatch.delenv(ENV, raising=False)
    with caplog.at_level(logging.INFO, logger="common.pipeline.notify"):
        assert send_stage_email(make_cfg(port, user="mailer", allow_insecure_login=True), "failure",
                                make_info(tmp_path)) is False
    assert rec.messages == [] and rec.logins == []
    assert ENV in caplog.text and "no failure e-mail sent" in caplog.text


def test_starttls_with_login(smtp_server, tmp_path, tls_files, monkeypatch):
    rec, port = smtp_server(tls_context=server_tls_context(tls_files), require_starttls=True,
                            authenticator=True, auth_require_tls=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files[0]))  # trust the self-signed certificate
    monkeypatch.setenv(ENV, PASSWORD)
    assert send_stage_email(make_cfg(port, security="starttls", user="mailer"), "failure", make_info(tmp_path))
    assert rec.logins == [("mailer", PASSWORD)] and len(rec.messages) == 1


def test_ssl_mode(smtp_server, tmp_path, tls_files, monkeypatch):
    rec, port = smtp_server(ssl_context=server_tls_context(tls_files))
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files[0]))
    assert send_stage_email(make_cfg(port, security="ssl"), "failure", make_info(tmp_path)) is True
    assert len(rec.messages) == 1


def test_untrusted_certificate_is_refused(smtp_server, tmp_path, tls_files, caplog, monkeypatch):
    rec, port = smtp_server(tls_context=server_tls_context(tls_files), require_starttls=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "no-such-ca.pem"))
    with caplog.at_level(logging.ERROR, logger="common.pipeline.notify"):
        assert send_stage_email(make_cfg(port, security="starttls"), "failure", make_info(tmp_path)) is False
    assert rec.messages == [] and "CERTIFICATE_VERIFY_FAILED" in caplog.text


def test_server_down_returns_false_and_logs(tmp_path, caplog):
    port = free_port()  # nothing listens there
    with caplog.at_level(logging.ERROR, logger="common.pipeline.notify"):
        assert send_stage_email(make_cfg(port), "failure", make_info(tmp_path)) is False
    assert f"127.0.0.1:{port}" in caplog.text and "ConnectionRefusedError" in caplog.text


def test_never_raises_on_bad_input(tmp_path, caplog):
    cfg = make_cfg(free_port())
    with caplog.at_level(logging.ERROR, logger="common.pipeline.notify"):
        assert send_stage_email(cfg, "exploded", make_info(tmp_path)) is False
        assert send_stage_email(replace(cfg, recipients=[]), "failure", make_info(tmp_path)) is False
        assert send_stage_email(cfg, "failure", {"elapsed_s": "soon", "log_path": None}) is False  # server down
        assert send_stage_email(None, "failure", {}) is False  # type: ignore[arg-type]
    assert "unknown event" in caplog.text and "notify.recipients is empty" in caplog.text


def test_scrub_and_duration():
    assert scrub("user pw=abc and abcdef", ["abc", "abcdef", None, ""]) == "user pw=*** and ***"
    assert scrub("nothing here", []) == "nothing here"
    assert scrub("tok tok", "tok") == "*** ***"
    assert human_duration(3.21) == "3.2 s"
    assert human_duration(725) == "12 min 05 s"
    assert human_duration(90061) == "1 d 01 h 01 min"


def test_login_over_plain_is_refused_unless_allowed(smtp_server, tmp_path, caplog, monkeypatch):
    rec, port = smtp_server(authenticator=True, auth_require_tls=False)
    monkeypatch.setenv(ENV, PASSWORD)
    with caplog.at_level(logging.INFO, logger="common.pipeline.notify"):
        assert send_stage_email(make_cfg(port, user="mailer"), "failure", make_info(tmp_path)) is False
    assert rec.messages == [] and rec.logins == []  # not even a connection that could carry the password
    assert "in clear" in caplog.text and "notify.allow_insecure_login" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="common.pipeline.notify"):
        assert send_stage_email(make_cfg(port, user="mailer", allow_insecure_login=True), "failure",
                                make_info(tmp_path)) is True
    assert rec.logins == [("mailer", PASSWORD)] and len(rec.messages) == 1
    assert any(r.levelno == logging.WARNING and "without encryption" in r.getMessage() for r in caplog.records)
    assert send_stage_email(make_cfg(port), "failure", make_info(tmp_path)) is True  # plain without login: fine


@pytest.mark.parametrize("overrides, ok", [
    (["notify.security=plain", "notify.user=mailer"], False),
    (["notify.security=plain", "notify.user=mailer", "notify.allow_insecure_login=true"], True),
    (["notify.security=starttls", "notify.user=mailer"], True),
    (["notify.security=ssl", "notify.user=mailer"], True),
    (["notify.security=plain"], True),
])
def test_config_refuses_a_password_in_clear(overrides, ok):
    from common.config.load import load_config
    from common.errors import ConfigError

    args = ["notify.enabled=true", *overrides]
    if ok:
        load_config([], args)
        load_config([], ["notify.enabled=false", *overrides])
        return
    with pytest.raises(ConfigError) as e:
        load_config([], args)
    msg = str(e.value)
    assert "\n" not in msg and "in clear" in msg and "starttls" in msg and "notify.allow_insecure_login: true" in msg
    load_config([], ["notify.enabled=false", *overrides])  # off: nothing is sent, nothing to refuse
