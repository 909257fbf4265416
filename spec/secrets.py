"""What counts as a secret in a spec, and how one is shown when a problem must mention it.

Secrets are never written into files. Every string of a spec is written into the bundle
(spec.resolved.yaml, env.sh, jobs/*/config.json; manifest.json keeps the `--set` texts), so
the spec refuses:

- a `cluster.env` variable whose *name* says it holds a secret (`secret_name`): the name is
  cut into words at '_', so WANDB_API_KEY (API, KEY) and DB_PASS are secrets while
  TOKENIZERS_PARALLELISM, KEYBOARD_LAYOUT or MONKEY are not;
- any string whose *value* looks like a credential (`credential`): the shapes of issued
  tokens and keys (Hugging Face, OpenAI-style, GitHub, GitLab, AWS, Google, Slack) at their
  real lengths, and PEM private-key blocks;
- a URL with a password in its userinfo (`url_password`), e.g. `https://bob:pw@host/`.

A refused value is never echoed: `mask` keeps at most its first 4 characters. Comments are
no values, so nothing refuses them; the bundle's copy of the spec file (`spec.yaml`) is
`redacted`: what looks like a credential, or a URL's password, is masked there (and the
compiler warns, naming the line). This module imports nothing of the spec, so `spec.errors`
can use it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

# Words (the parts of a name between '_') that name a secret. Compounds the word list
# cannot see are matched by suffix: HFTOKEN, CLIENTSECRET, OAUTH, APIKEY.
_SECRET_WORDS = frozenset({
    "KEY", "KEYS", "APIKEY", "ACCESSKEY", "SECRETKEY", "PRIVKEY", "PRIVATEKEY", "SSHKEY",
    "AUTHKEY", "SIGNINGKEY", "PASS", "PASSWD", "PASSWORD", "PASSPHRASE", "PASSCODE", "PWD",
    "PAT", "AUTH", "AUTHN", "AUTHZ", "AUTHORIZATION", "PRIV", "COOKIE", "COOKIES", "SESSION",
    "SESSIONID", "CRED", "CREDS", "JWT", "BEARER",
})
_SECRET_SUFFIXES = ("TOKEN", "SECRET", "SECRETS", "PASSWORD", "PASSWD", "AUTH", "COOKIE")
_SECRET_PARTS = ("SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "PRIVATE")
# A last word that makes the variable point at a secret rather than hold it (a key file, a
# token's path, the auth server's URL): its value is no secret. A URL that carries one is
# refused by `url_password` / `credential` anyway.
_POINTERS = frozenset({"FILE", "PATH", "DIR", "URL", "SOCK", "SOCKET"})
# Well-known variables whose value is the path of a credentials file, not the credential.
_PATH_VARIABLES = frozenset({"GOOGLE_APPLICATION_CREDENTIALS", "AWS_SHARED_CREDENTIALS_FILE"})


def secret_word(name: str) -> str | None:
    """The word of an environment variable's name that says it holds a secret, or None."""
    words = [w for w in name.upper().split("_") if w]
    if (not words or words[-1] in _POINTERS or name.upper() == "PWD"  # $PWD is a directory
            or name.upper() in _PATH_VARIABLES):
        return None
    for word in words:
        if (word in _SECRET_WORDS or word.endswith(_SECRET_SUFFIXES)
                or any(part in word for part in _SECRET_PARTS)):
            return word
    return None


def secret_name(name: str) -> bool:
    """Whether an environment variable's name says it holds a secret (see `secret_word`)."""
    return secret_word(name) is not None


_B = r"(?<![A-Za-z0-9_-])"  # a token starts at a word boundary ('disk-...' is no 'sk-')
_E = r"(?![A-Za-z0-9])"
# (what it looks like, pattern): issued credentials, at the lengths their issuers give them.
_CREDENTIALS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("a Hugging Face token", re.compile(_B + r"hf_[A-Za-z0-9]{30,}" + _E)),
    ("an OpenAI-style API key", re.compile(_B + r"sk-(?=[A-Za-z0-9_-]*[0-9])[A-Za-z0-9_-]{20,}")),
    ("a GitHub token", re.compile(_B + r"(gh[pousr]_[A-Za-z0-9]{36,}|github_pat_\w{22,})")),
    ("a GitLab token", re.compile(_B + r"glpat-[A-Za-z0-9_-]{20,}")),
    ("an AWS access key id", re.compile(_B + r"(AKIA|ASIA)[0-9A-Z]{16}" + _E)),
    ("a Google API key", re.compile(_B + r"AIza[0-9A-Za-z_-]{35}")),
    ("a Slack token", re.compile(_B + r"xox[abeoprs]-[A-Za-z0-9-]{10,}")),
    ("a private key (PEM)", re.compile(r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY[A-Z ]*-----")),
)
# scheme://userinfo@host: the userinfo ends at the first '@' before the path.
_USERINFO = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://([^/?#@\s]*)@")


def credential(value: str) -> str | None:
    """What `value` holds that looks like an issued credential ('a GitHub token'), or None."""
    for what, pattern in _CREDENTIALS:
        if pattern.search(value):
            return what
    return None


def url_password(value: str) -> bool:
    """Whether `value` holds a URL with a password in its userinfo (`scheme://u:pw@host`)."""
    for m in _USERINFO.finditer(value):
        _, colon, password = m.group(1).partition(":")
        if colon and password:
            return True
    return False


def looks_secret(value: str) -> bool:
    """A credential, or a URL with a password: a value that must be neither written nor shown."""
    return credential(value) is not None or url_password(value)


def mask(value: str) -> str:
    """A secret as it may be shown: at most its first 4 characters (fewer of a short one, at
    most a third of it), then '***'."""
    return value[: min(4, len(value) // 3)] + "***"


def mask_override(text: str) -> str:
    """A `--set path=value` text as it may be shown: the value masked when it is a secret,
    i.e. when it looks like one or sets a `cluster.env` variable whose name is one."""
    key, eq, value = text.partition("=")
    if not eq:
        return mask(text) if looks_secret(text) else text
    parts = [p for p in re.split(r"[.\[\]]", key.strip()) if p]
    if parts[:2] == ["cluster", "env"] and len(parts) == 3:
        env_secret = secret_name(parts[2])
    elif parts in (["cluster"], ["cluster", "env"]):  # a mapping: any variable it names
        env_secret = any(secret_name(w) for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", value))
    else:
        env_secret = False
    return f"{key}={mask(value.strip())}" if env_secret or looks_secret(value) else text


def secrets_in(data: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], str]]:
    """(path, what) of each secret in a spec's plain data: a string that looks like one,
    a `cluster.env` variable named as one. For data the models never see (what `--set`
    replaced), which is written all the same (the file is copied into the bundle)."""
    if isinstance(data, dict):
        for key, value in data.items():
            if path == ("cluster", "env") and isinstance(key, str) and secret_name(key):
                yield (*path, key), f"cluster.env.{key} is a secret's name"
            else:
                yield from secrets_in(value, (*path, key))
    elif isinstance(data, list):
        for i, item in enumerate(data):
            yield from secrets_in(item, (*path, i))
    elif isinstance(data, str) and looks_secret(data):
        what = credential(data) or "a URL with a password"
        yield path, f"{mask(data)!r} looks like {what}"


def redacted(text: str) -> tuple[str, list[tuple[int, str]]]:
    """``text`` with every credential and URL password masked (`mask`), and (line, what) of
    each: for copying a spec file, whose comments no check reads, into the bundle."""
    spans: list[tuple[int, int, str]] = []
    for what, pattern in _CREDENTIALS:
        spans += [(m.start(), m.end(), what) for m in pattern.finditer(text)]
    for m in _USERINFO.finditer(text):
        user, colon, password = m.group(1).partition(":")
        if colon and password:
            start = m.start(1) + len(user) + 1
            spans.append((start, start + len(password), "a URL with a password"))
    out, found, end = [], [], 0
    for start, stop, what in sorted(spans):
        if start < end:  # inside a span masked already
            continue
        out += [text[end:start], mask(text[start:stop])]
        found.append((text.count("\n", 0, start) + 1, what))
        end = stop
    out.append(text[end:])
    return "".join(out), found
