"""E-mail when a stage fails, finishes or is interrupted (the ``notify`` config section).

The stage wrapper (``common.stage``) calls :func:`send_stage_email` once, after the stage's
outcome is settled. Sending is best effort: the function never raises (a failure to send is
logged with its reason and gives ``False``) and changes nothing but the log.

Connection: ``security: ssl`` is SMTPS (``smtplib.SMTP_SSL``, port 465), ``starttls`` a plain
connection upgraded with ``STARTTLS`` (port 587), ``plain`` no encryption (port 25, or a local
relay). Certificates are verified against the system's CAs (``ssl.create_default_context``; a
private CA can be given with the ``SSL_CERT_FILE`` environment variable). A login over ``plain``
would send the password in clear: it is refused (when the configuration is loaded, and again
here) unless ``notify.allow_insecure_login`` is true. A login happens only when ``notify.user``
is set; its password is read from the environment variable named by ``notify.password_env``,
never from the config file. When that variable is missing, nothing is sent (an error says which
variable to set).

The password never leaves this module: it is scrubbed (with its base64 forms, as AUTH sends
them) from the subject and body of the e-mail, which may quote a traceback or error in which the
program printed it, and from every error message this module logs.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import smtplib
import socket
import ssl
from collections.abc import Iterable
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any, Optional

from ..config.schema import INSECURE_LOGIN_MESSAGE, Config, NotifyConfig

log = logging.getLogger(__name__)


EVENTS = {"failure": "FAILED", "success": "FINISHED", "interrupt": "INTERRUPTED"}
REDACTED = "***"
_LOG_TAIL_BYTES = 256 * 1024  # read at most this much from the end of log.txt for its tail
_METRICS_MAX_KEYS = 60  # keys of the metrics summary listed in a success e-mail
_VALUE_MAX_CHARS = 200  # a metrics value longer than this is cut


def scrub(text: str, secrets: Iterable[Optional[str]] | Optional[str]) -> str:
    """``text`` with every occurrence of each secret replaced by ``***``.

    ``secrets`` is one string or an iterable of them (``None`` and empty ones are ignored);
    longer secrets are replaced first, so a secret containing another is not half-replaced.
    """
    if isinstance(secrets, str):
        secrets = [secrets]
    found = sorted({s for s in (secrets or ()) if s}, key=len, reverse=True)
    text = "" if text is None else str(text)
    for s in found:
        text = text.replace(s, REDACTED)
    return text


def _secret_forms(user: Optional[str], password: Optional[str]) -> list[str]:
    """The password as it may appear in text: verbatim, repr-escaped, and base64 as SMTP AUTH sends it."""
    if not password:
        return []
    forms = {password, repr(password)[1:-1]}
    b64 = lambda s: base64.b64encode(s.encode("utf-8")).decode("ascii")  # noqa: E731
    forms.add(b64(password))  # AUTH LOGIN
    if user:
        forms.add(b64(f"\0{user}\0{password}"))  # AUTH PLAIN
    return [f for f in forms if f]


def human_duration(seconds: float) -> str:
    """``3.2 s``, ``12 min 05 s``, ``2 h 03 min``, ``1 d 02 h 03 min``."""
    try:
        s = max(0.0, float(seconds))
    except (TypeError, ValueError):
        return "unknown"
    if s < 60:
        return f"{s:.1f} s"
    s = int(round(s))
    d, rem = divmod(s, 86400)
    h, rem = divmod(rem, 3600)
    m, sec = divmod(rem, 60)
    if d:
        return f"{d} d {h:02d} h {m:02d} min"
    if h:
        return f"{h} h {m:02d} min"
    return f"{m} min {sec:02d} s"


def _tail_lines(text: str, n: int) -> list[str]:
    lines = text.rstrip("\n").splitlines()
    return lines[-n:] if n > 0 else []


def _log_tail(path: str, n: int) -> list[str]:
    """The last ``n`` lines of the log file (empty when it cannot be read)."""
    try:
        p = Path(path)
        with p.open("rb") as fh:
            size = p.stat().st_size
            fh.seek(max(0, size - _LOG_TAIL_BYTES))
            data = fh.read().decode("utf-8", errors="replace")
    except (OSError, TypeError, ValueError):
        return []
    return _tail_lines(data, n)


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        text = f"{v:.6g}"
    elif isinstance(v, (dict, list, tuple)):
        text = json.dumps(v, default=str, ensure_ascii=False)
    else:
        text = str(v)
    return text if len(text) <= _VALUE_MAX_CHARS else text[: _VALUE_MAX_CHARS - 3] + "..."


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def build_message(cfg: NotifyConfig, event: str, info: dict, secrets: Iterable[str] = ()) -> EmailMessage:
    """The e-mail for ``event`` (``failure``, ``success``, ``interrupt``), password scrubbed.

    Subject ``[plankton] FAILED 03_main_supcon on host (run runs/dyb)``; the body gives the stage,
    run, host, elapsed time, exit code, error, the last ``cfg.log_lines`` lines of the traceback
    (or of the log when there is no traceback), where the log is, and the metrics on success.
    """
    secrets = list(secrets)
    label = EVENTS[event]
    stage = info.get("stage") or "?"
    run_dir = info.get("run_dir") or "?"
    host = info.get("host") or socket.gethostname()
    subject = _one_line(f"[plankton] {label} {stage} on {host} (run {run_dir})")

    rows = [("Stage", stage), ("Outcome", label), ("Exit code", info.get("exit_code", "?")),
            ("Run", run_dir), ("Host", host), ("Elapsed", human_duration(info.get("elapsed_s", 0.0)))]
    if info.get("error"):
        rows.append(("Error", _one_line(info["error"])))
    rows.append(("Log", info.get("log_path") or "?"))
    width = max(len(k) for k, _ in rows) + 1
    body = [f"{k + ':':<{width}} {v}" for k, v in rows]

    n = max(0, int(cfg.log_lines))
    tb = info.get("traceback")
    if tb and n:
        body += ["", f"Traceback (last {n} lines):", *_tail_lines(str(tb), n)]
    elif n and info.get("log_path"):
        tail = _log_tail(info["log_path"], n)
        if tail:
            body += ["", f"Log (last {len(tail)} lines of {info['log_path']}):", *tail]

    metrics = info.get("metrics")
    if event == "success" and isinstance(metrics, dict) and metrics:
        body += ["", "Metrics:"]
        items = list(metrics.items())
        body += [f"  {k}: {_fmt_value(v)}" for k, v in items[:_METRICS_MAX_KEYS]]
        if len(items) > _METRICS_MAX_KEYS:
            body.append(f"  ... and {len(items) - _METRICS_MAX_KEYS} more in manifest.json")

    msg = EmailMessage()
    msg["Subject"] = scrub(subject, secrets)
    msg["From"] = cfg.sender
    msg["To"] = ", ".join(cfg.recipients)
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid(domain=_one_line(host).replace(" ", "") or None)
    msg.set_content(scrub("\n".join(str(line) for line in body), secrets) + "\n")
    return msg


def _connect(cfg: NotifyConfig) -> smtplib.SMTP:
    """An SMTP connection in the configured security mode (TLS verified), not logged in."""
    if cfg.security == "ssl":
        return smtplib.SMTP_SSL(cfg.smtp_host, cfg.smtp_port, timeout=cfg.timeout,
                                context=ssl.create_default_context())
    smtp = smtplib.SMTP(cfg.smtp_host, cfg.smtp_port, timeout=cfg.timeout)
    if cfg.security == "starttls":
        try:
            smtp.ehlo()
            smtp.starttls(context=ssl.create_default_context())
            smtp.ehlo()
        except BaseException:
            smtp.close()
            raise
    return smtp


def send_stage_email(cfg: NotifyConfig, event: str, info: dict) -> bool:
    """E-mail the outcome of a stage per ``cfg``; True when the server accepted the message.

    ``event`` is ``failure``, ``success`` or ``interrupt``; ``info`` has ``stage``, ``run_dir``,
    ``host``, ``elapsed_s``, ``error``, ``traceback``, ``log_path``, ``exit_code``, ``metrics``.
    Returns False, without sending, when notifications or this event are switched off, and when
    sending fails (logged with the reason). Never raises; the password never appears in the
    e-mail or the log.
    """
    secrets: list[str] = []
    try:
        if event not in EVENTS:
            log.error("notify: unknown event %r (failure, success, interrupt): no e-mail sent", event)
            return False
        if not cfg.enabled or not getattr(cfg, f"on_{event}"):
            log.debug("notify: %s e-mails are off", event)
            return False
        if not cfg.recipients:
            log.error("notify.recipients is empty: no %s e-mail sent", event)
            return False
        if cfg.security not in ("ssl", "starttls", "plain"):
            log.error("notify.security is %r (ssl, starttls, plain): no %s e-mail sent", cfg.security, event)
            return False
        password: Optional[str] = None
        if cfg.user and cfg.security == "plain":
            if not getattr(cfg, "allow_insecure_login", False):
                log.error("%s: no %s e-mail sent", INSECURE_LOGIN_MESSAGE, event)
                return False
            log.warning("notify: logging in to %s:%s without encryption (notify.allow_insecure_login): the "
                        "password crosses the network in clear", cfg.smtp_host, cfg.smtp_port)
        if cfg.user:
            password = os.environ.get(cfg.password_env)
            if not password:
                log.error("notify.user is set but the environment variable %s (notify.password_env) is "
                          "not: no %s e-mail sent", cfg.password_env, event)
                return False
            secrets = _secret_forms(cfg.user, password)
        msg = build_message(cfg, event, info, secrets)
        with _connect(cfg) as smtp:
            if cfg.user:
                smtp.login(cfg.user, password)
            refused = smtp.send_message(msg)
        if refused:
            log.warning("notify: the server refused %s", ", ".join(sorted(refused)))
        log.info("notify: sent the %s e-mail to %s via %s:%s (%s)", event,
                 ", ".join(r for r in cfg.recipients if r not in refused), cfg.smtp_host, cfg.smtp_port,
                 cfg.security)
        return True
    except Exception as e:  # noqa: BLE001 - e-mail is best effort and must not change the outcome
        try:
            reason = scrub(f"{e.__class__.__name__}: {e}", secrets)
            where = f"{getattr(cfg, 'smtp_host', '?')}:{getattr(cfg, 'smtp_port', '?')}"
            log.error("notify: could not send the %s e-mail via %s (%s): %s", event, where,
                      getattr(cfg, "security", "?"), _one_line(reason))
        except Exception:  # noqa: BLE001 - even a failure to describe the failure stays silent
            pass
        return False


def _send_email(cfg: Config, event: str, info: dict) -> None:
    """E-mail per config; a failure to send is logged and never changes the stage's outcome."""
    if not cfg.notify.enabled:
        return
    try:


        send_stage_email(cfg.notify, event, info)
    except Exception as e:  # noqa: BLE001 - the stage's own outcome must win
        log.error("could not send the %s e-mail: %s", event, e.__class__.__name__)
