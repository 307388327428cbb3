"""Ed25519 keys: load, create, fingerprint, and the OpenSSH/PEM forms people already have.

All cryptography comes from the ``cryptography`` package; this module only decides where
keys live and how they are named. A key's id is ``SHA256:`` plus the unpadded base64 of
the sha256 of its raw 32 bytes, the same fingerprint ``ssh-keygen -lf`` prints, so people
can match it with the key they use for git commit signing.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mlc.errors import InvalidKeyError

KEY_FILE_ENV = "MLC_SIGNING_KEY"
"""Path of the private key to sign with (an ``mlc key create`` file or an OpenSSH key)."""


def default_key_path() -> Path:
    """Where ``mlc key create`` writes the key: ``$MLC_SIGNING_KEY`` or the user's config dir."""
    explicit = os.environ.get(KEY_FILE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "mlc" / "signing-key.pem"


def key_id(public: Ed25519PublicKey) -> str:
    """The key's fingerprint, as ``ssh-keygen -lf`` prints it."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    digest = base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def public_text(public: Ed25519PublicKey, comment: str = "") -> str:
    """The key as one ``ssh-ed25519 AAAA... comment`` line (how keys are registered and shown)."""
    line = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{line} {comment}".strip()


def parse_public_key(text: str) -> Ed25519PublicKey:
    """Read an ``ssh-ed25519`` line or a PEM public key; refuse any other algorithm."""
    data = text.strip().encode()
    try:
        if data.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_ssh_public_key(b" ".join(data.split()[:2]))
    except (ValueError, IndexError) as exc:
        hint = "give an `ssh-ed25519 AAAA...` line or a PEM"
        raise InvalidKeyError(f"not a public key ({exc}); {hint}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidKeyError(f"only Ed25519 keys are accepted, not {type(key).__name__}")
    return key


def create_key(path: Path) -> Ed25519PrivateKey:
    """Write a new private key to ``path`` (mode 0600); refuse to overwrite one."""
    if path.exists():
        raise InvalidKeyError(f"{path} already exists; `mlc key show` prints its public key")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    return key


def load_private_key(path: Path | None = None) -> Ed25519PrivateKey:
    """Load the signing key (PKCS#8 PEM or an unencrypted OpenSSH private key)."""
    where = path or default_key_path()
    try:
        data = where.read_bytes()
    except FileNotFoundError:
        raise InvalidKeyError(
            f"no signing key at {where}: create one with `mlc key create` (or point "
            f"{KEY_FILE_ENV} at your ssh-ed25519 private key)"
        ) from None
    return _parse_private(data, where)


def _parse_private(data: bytes, where: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in ``data`` (PKCS#8 PEM or unencrypted OpenSSH), read from ``where``."""
    try:
        key: object = (
            serialization.load_ssh_private_key(data, password=None)
            if b"OPENSSH PRIVATE KEY" in data
            else serialization.load_pem_private_key(data, password=None)
        )
    except (ValueError, TypeError) as exc:
        raise InvalidKeyError(f"{where} is not an unencrypted private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidKeyError(f"{where} is not an Ed25519 key ({type(key).__name__})")
    return key


def ensure_key(path: Path) -> Ed25519PrivateKey:
    """Load the key at ``path``, creating it first if it does not exist (service keys).

    Whoever could put a key there (a link to another key, a file of another account, one
    others may rewrite) could sign as its owner: an existing file is used only when it is a
    regular file of this process's user that nobody else may read or write (0600, as made).

    Raises:
        InvalidKeyError: the file is not that, naming it and the fix.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return create_key(path)
    except OSError as exc:  # ELOOP: a link
        raise InvalidKeyError(
            f"{path} is not a key file ({exc.strerror}): remove it or put the key there"
        ) from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
            raise InvalidKeyError(
                f"{path} is not a private key file of uid {os.geteuid()} (owner uid {info.st_uid}, "
                f"mode {stat.filemode(info.st_mode)}): make it one (chown, chmod 600) or remove it"
            )
        return _parse_private(fh.read(), path)


def verify(public: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` is ``public``'s signature of ``message``."""
    try:
        public.verify(signature, message)
    except InvalidSignature:
        return False
    return True
