"""Lazy memory served by engines people run (nginx, an S3 store) over a network that fails.

Every program that touches lazy memory runs in a child process (``python3`` started here, inside
the client namespace for the two-host tests) that prints one line per page touched; the test
compares each against the source and reads how the child ended. What each test injects:

- ``test_tls_basic_auth_on_loopback``: nothing; right credentials over TLS, byte for byte.
- ``test_refused_credentials_fail_at_once``: 2 refused logins (wrong password, no credentials;
  HTTP 401) and 1 server certificate the client does not trust.
- ``test_two_hosts_over_veth``: nothing; nginx in one namespace, the program in the other.
- ``test_server_killed_and_restarted``: 1 kill of nginx mid-transfer (restarted within budget).
- ``test_server_killed_for_good``: 1 kill of nginx mid-transfer, not restarted: SIGBUS.
- ``test_link_cut_and_restored``: 1 link cut (server's veth down, up within budget).
- ``test_link_cut_for_good``: 1 link cut, kept down: SIGBUS.
- ``test_s3_keys``: 2 refused key pairs (wrong secret, unknown key id) against moto with IAM
  authentication on; right keys served.
- ``test_corrupted_chunk_is_never_served``: 1 corrupted chunk (one byte flipped), detected by its
  hash: SIGBUS on that chunk's page, every other chunk served.
- ``test_truncated_pack_is_refused``: 1 truncated pack object, refused at open.

Totals (:data:`FAULTS`): 4 network faults (2 kills, 2 link cuts), 4 refused credentials (2 HTTP,
2 S3), 1 untrusted certificate, 1 corrupted chunk detected, 1 truncated object detected.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import errno
import hashlib
import ipaddress
import json
import os
import queue
import signal
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.reliability import _netns
from tests.stores import _servers
from tests.stores.conftest import make_payload
from userfaultfd import memory
from userfaultfd.stores import StoreError, open_store, pack

#: What the module injects, for the README's reliability table.
FAULTS = {
    "server kills": 2,
    "link cuts": 2,
    "refused credentials": 4,
    "untrusted certificates": 1,
    "corrupted chunks detected": 1,
    "truncated objects detected": 1,
}

PAGE = memory.page_size()
PAGES = 64
#: Not a whole number of pages: the last page is short.
SIZE = PAGES * PAGE + 100
CHUNK = 64 << 10
USER, PASSWORD = "reader", "correct horse battery staple"
ROOT = Path(__file__).resolve().parents[2]

#: Small budgets keep the failure tests fast: 5 tries, 0.2 s doubling, so a dead server is given up
#: after 0.2 + 0.4 + 0.8 + 1.6 = 3 s of waiting; a request with no answer after 1 s is a failure.
TRIES, BACKOFF, TIMEOUT = 5, 0.2, 1.0

pytestmark = pytest.mark.skipif(not os.path.exists(_servers.NGINX), reason="nginx is missing")


# --- the program under test, run in a child process -----------------------------------------------

_CLIENT = r"""
import hashlib, json, signal, sys, time

spec = json.loads(sys.argv[1])
signal.alarm(spec["deadline"])  # a client stuck for good dies by SIGALRM, never by SIGBUS
from userfaultfd.runtime import Single, lazy, server_of
from userfaultfd.stores import open_store

options = dict(spec["store"])
if "ca" in spec:
    import ssl
    options["ssl"] = ssl.create_default_context(cafile=spec["ca"])
if "user" in spec:
    import base64
    basic = base64.b64encode(f"{spec['user']}:{spec['password']}".encode()).decode()
    options["client_kwargs"] = {"headers": {"Authorization": "Basic " + basic}}
memory = lazy(open_store(spec["url"], **options), policy=Single())
page = spec["page"]
for n, i in enumerate(spec["order"]):
    if n == spec.get("pause_at"):
        print("paused", flush=True)
        sys.stdin.readline()
    started = time.monotonic()
    data = bytes(memory[i * page:(i + 1) * page])
    took = time.monotonic() - started
    print("page", i, hashlib.sha256(data).hexdigest(), f"{took:.3f}", flush=True)
stats = server_of(memory).stats()
print("done", stats.pages, stats.errors, stats.poisoned, flush=True)
"""


@dataclass(frozen=True, slots=True)
class Outcome:
    #: Page index -> (sha256 of what the program read, seconds the touch took), in touch order.
    pages: dict[int, tuple[str, float]]
    #: The "done" line's pages, errors, poisoned; None if the program died first.
    done: tuple[int, int, int] | None
    returncode: int
    stderr: str


class Client:
    """The client program; ``expect()`` waits for a line, ``finish()`` for its end."""

    def __init__(self, tmp_path: Path, spec: dict[str, Any], ns: _netns.Namespace | None) -> None:
        script = tmp_path / "client.py"
        script.write_text(_CLIENT)
        argv = [sys.executable, str(script), json.dumps({"page": PAGE, "deadline": 60, **spec})]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
        env["PYTHONPATH"] = str(ROOT)
        kwargs: dict[str, Any] = dict(
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
            start_new_session=True,  # its handler and supervisor share its group: killed with it
        )  # fmt: skip
        self.proc = ns.popen(argv, **kwargs) if ns else subprocess.Popen(argv, **kwargs)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode())
        self.lines.put(None)

    def expect(self, word: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            line = self.lines.get(timeout=left)
            if line is None:
                break
            self.seen.append(line)
            if line.split()[0] == word:
                return
        raise AssertionError(f"no {word!r} line from the client; it said {self.seen}")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 40) -> Outcome:
        try:
            self.proc.wait(timeout)
        finally:
            self.kill()
        while (line := self.lines.get(timeout=5)) is not None:
            self.seen.append(line)
        pages: dict[int, tuple[str, float]] = {}
        done = None
        for line in self.seen:
            word, *rest = line.split()
            if word == "page":
                pages[int(rest[0])] = (rest[1], float(rest[2]))
            elif word == "done":
                done = (int(rest[0]), int(rest[1]), int(rest[2]))
        assert self.proc.stderr is not None
        return Outcome(pages, done, self.proc.returncode, self.proc.stderr.read().decode())

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group we made: it and its handler
        self.proc.wait(10)


def page_hash(data: bytes, index: int) -> str:
    return hashlib.sha256(data[index * PAGE : (index + 1) * PAGE]).hexdigest()


def first_wrong_page(outcome: Outcome, data: bytes, read: list[int]) -> str:
    """ "" if every page in ``read`` held its source bytes; else the first that did not, what
    it held and what it should have (SHA-256 of the page), and how many were wrong."""
    wrong = [i for i in read if outcome.pages[i][0] != page_hash(data, i)]
    if not wrong:
        return ""
    first = wrong[0]
    return (f"page {first} held sha256 {outcome.pages[first][0]}, not {page_hash(data, first)} "
            f"({len(wrong)} of {len(read)} pages wrong)")  # fmt: skip


def assert_all_served(outcome: Outcome, data: bytes, order: list[int]) -> None:
    assert outcome.returncode == 0, outcome.stderr
    assert list(outcome.pages) == order
    wrong = first_wrong_page(outcome, data, order)
    assert not wrong, f"pages served wrong: {wrong}"
    assert outcome.done is not None, f"the program reported no end: {outcome.stderr}"
    assert outcome.done[1:] == (0, 0), f"(errors, poisoned) = {outcome.done[1:]}, not (0, 0)"


def assert_sigbus_after_correct_pages(outcome: Outcome, data: bytes, order: list[int]) -> int:
    """The program died by SIGBUS; every page it read was right. Returns the page it died on."""
    assert outcome.returncode == -signal.SIGBUS, (outcome.returncode, outcome.stderr)
    read = list(outcome.pages)
    assert read == order[: len(read)]
    wrong = first_wrong_page(outcome, data, read)
    assert not wrong, f"pages served wrong before the SIGBUS: {wrong}"
    return order[len(read)]


# --- TLS, basic auth and nginx --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tls:
    ca: Path
    cert: Path
    key: Path


def make_tls(directory: Path, addresses: list[str]) -> Tls:
    """A self-signed CA and a server certificate it signed for ``addresses`` (SAN IPs)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "uffd test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                       critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, addresses[0])]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    tls = Tls(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    tls.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    tls.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tls.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return tls


def basic_auth(user: str, password: str) -> str:
    """An Authorization header's value (aiohttp's BasicAuth is deprecated in 3.14)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def htpasswd_line(user: str, password: str) -> str:
    """nginx's ``{SSHA}`` scheme: base64(sha1(password + salt) + salt)."""
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return f"{user}:{{SSHA}}{base64.b64encode(digest + salt).decode()}\n"


def nginx(root: Path, prefix: Path, tls: Tls, address: str,
          ns: _netns.Namespace | None) -> _servers.Nginx:  # fmt: skip
    """nginx with TLS and basic auth on ``address``, in ``ns`` or the test's namespace."""
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "htpasswd").write_text(htpasswd_line(USER, PASSWORD))
    return _servers.Nginx(root, prefix, address=address, port=8443 if ns else None, ns=ns,
                          tls=(tls.cert, tls.key), htpasswd=prefix / "htpasswd")  # fmt: skip


@dataclass(frozen=True, slots=True)
class Site:
    """Files behind one nginx: ``data.bin`` (the payload), ``data.pack`` (it, packed)."""

    nginx: _servers.Nginx
    tls: Tls
    root: Path
    data: bytes

    def spec(self, name: str, **extra: Any) -> dict[str, Any]:
        """The client's spec for ``name`` with the right credentials and the small budget."""
        store = {"tries": TRIES, "backoff": BACKOFF, "timeout": TIMEOUT}
        return {"url": f"{self.nginx.url}/{name}", "store": store, "ca": str(self.tls.ca),
                "user": USER, "password": PASSWORD, **extra}  # fmt: skip

    def options(self, password: str = PASSWORD) -> dict[str, Any]:
        """Store options for this process (no faults here: only opening a store)."""
        return {
            "tries": TRIES, "backoff": 5.0, "timeout": TIMEOUT,  # a retry would show as 5 s
            "ssl": ssl.create_default_context(cafile=str(self.tls.ca)),
            "client_kwargs": {"headers": {"Authorization": basic_auth(USER, password)}},
        }  # fmt: skip


def _site(tmp_path: Path, address: str, ns: _netns.Namespace | None) -> Iterator[Site]:
    data = make_payload(SIZE, seed=7)
    root = tmp_path / "root"
    root.mkdir()
    (root / "data.bin").write_bytes(data)
    pack(root / "data.bin", root / "data.pack", chunk_size=CHUNK)
    tls = make_tls(tmp_path, [address])
    server = nginx(root, tmp_path / "nginx", tls, address, ns)
    try:
        yield Site(server, tls, root, data)
    finally:
        server.kill()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    """nginx on loopback."""
    yield from _site(tmp_path, "127.0.0.1", None)


@pytest.fixture
def hosts() -> Iterator[_netns.Pair]:
    try:
        with _netns.pair() as made:
            yield made
    except _netns.NetnsUnavailableError as err:
        pytest.skip(f"cannot make network namespaces here: {err}")


@pytest.fixture
def remote_site(tmp_path: Path, hosts: _netns.Pair) -> Iterator[Site]:
    """nginx in the server namespace, on its veth address."""
    yield from _site(tmp_path, hosts.server.address, hosts.server)


# --- loopback: credentials and TLS ----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_tls_basic_auth_on_loopback(site: Site, tmp_path: Path) -> None:
    order = list(range(PAGES + 1))
    for name in ("data.bin", "data.pack"):
        outcome = Client(tmp_path, site.spec(name, order=order), None).finish()
        assert_all_served(outcome, site.data, order)


@pytest.mark.timeout(30)
def test_refused_credentials_fail_at_once(site: Site) -> None:
    url = f"{site.nginx.url}/data.bin"
    for options in (site.options(password="wrong"), {**site.options(), "client_kwargs": {}}):
        started = time.monotonic()
        with pytest.raises(StoreError, match="refused the credentials \\(HTTP 401\\)") as caught:
            open_store(url, **options)
        assert caught.value.errno == errno.EACCES
        assert url in str(caught.value)
        assert time.monotonic() - started < 2  # not retried (the backoff is 5 s)
    # A client that does not trust the CA never reads a byte from the server.
    untrusted = {**site.options(), "ssl": ssl.create_default_context()}
    started = time.monotonic()
    with pytest.raises(StoreError, match="certificate") as caught:
        open_store(url, **untrusted)
    assert time.monotonic() - started < 2
    # And the right credentials open it (the server was not the problem).
    with open_store(url, **site.options()) as store:
        assert store.size == SIZE


# --- two hosts: nginx in one namespace, the program in the other ----------------------------------


@pytest.mark.timeout(60)
def test_two_hosts_over_veth(remote_site: Site, hosts: _netns.Pair, tmp_path: Path) -> None:
    order = list(range(PAGES + 1))
    for name in ("data.bin", "data.pack"):
        outcome = Client(tmp_path, remote_site.spec(name, order=order), hosts.client).finish()
        assert_all_served(outcome, remote_site.data, order)


PAUSE = 16  # pages served before the fault is injected


def _paused_client(site: Site, hosts: _netns.Pair, tmp_path: Path) -> tuple[Client, list[int]]:
    order = list(range(PAGES + 1))
    client = Client(tmp_path, site.spec("data.bin", order=order, pause_at=PAUSE), hosts.client)
    client.expect("paused")
    return client, order


@pytest.mark.timeout(60)
def test_server_killed_and_restarted(remote_site: Site, hosts: _netns.Pair, tmp_path: Path) -> None:
    client, order = _paused_client(remote_site, hosts, tmp_path)
    remote_site.nginx.kill()
    client.go()  # the next page's requests find the server gone
    time.sleep(0.5)  # two tries fail (refused), the third, at 0.6 s, finds it back
    remote_site.nginx.start()
    outcome = client.finish()
    assert_all_served(outcome, remote_site.data, order)
    assert outcome.pages[order[PAUSE]][1] >= 0.5  # that page waited for the restart


@pytest.mark.timeout(60)
def test_server_killed_for_good(remote_site: Site, hosts: _netns.Pair, tmp_path: Path) -> None:
    client, order = _paused_client(remote_site, hosts, tmp_path)
    remote_site.nginx.kill()
    started = time.monotonic()
    client.go()
    outcome = client.finish()
    assert assert_sigbus_after_correct_pages(outcome, remote_site.data, order) == order[PAUSE]
    assert 3 <= time.monotonic() - started < 15  # the whole retry budget, and not much more


@pytest.mark.timeout(60)
def test_link_cut_and_restored(remote_site: Site, hosts: _netns.Pair, tmp_path: Path) -> None:
    client, order = _paused_client(remote_site, hosts, tmp_path)
    hosts.server.link(up=False)  # packets to the server vanish: only the timeout notices
    client.go()
    time.sleep(1.5)  # the first try times out at 1 s, the second at 2.2 s, the third succeeds
    hosts.server.link(up=True)
    outcome = client.finish()
    assert_all_served(outcome, remote_site.data, order)
    assert outcome.pages[order[PAUSE]][1] >= TIMEOUT


@pytest.mark.timeout(60)
def test_link_cut_for_good(remote_site: Site, hosts: _netns.Pair, tmp_path: Path) -> None:
    client, order = _paused_client(remote_site, hosts, tmp_path)
    hosts.server.link(up=False)
    started = time.monotonic()
    client.go()
    outcome = client.finish()
    assert assert_sigbus_after_correct_pages(outcome, remote_site.data, order) == order[PAUSE]
    # Each try waits TIMEOUT; with the backoff, 5 + 3 s; a hang would be the 60 s deadline.
    assert TRIES * TIMEOUT <= time.monotonic() - started < 20


# --- integrity ------------------------------------------------------------------------------------


def _frames(pack_bytes: bytes) -> list[tuple[int, int]]:
    """(offset, length) of every chunk's frame, from the pack's footer and index."""
    index_offset, count, _digest, _magic = struct.unpack("<QQ16s8s", pack_bytes[-40:])
    entries = [
        struct.unpack_from("<QI16s", pack_bytes, index_offset + 28 * i) for i in range(count)
    ]
    return [(offset, length) for offset, length, _ in entries]


@pytest.mark.timeout(60)
def test_corrupted_chunk_is_never_served(site: Site, tmp_path: Path) -> None:
    bad = 2  # chunk 2: pages 32..47
    packed = bytearray((site.root / "data.pack").read_bytes())
    offset, length = _frames(bytes(packed))[bad]
    packed[offset + length // 2] ^= 0x40
    (site.root / "data.pack").write_bytes(packed)
    per_chunk = CHUNK // PAGE
    in_bad = range(bad * per_chunk, (bad + 1) * per_chunk)
    # Every other page first (all must be served), then the corrupted chunk's.
    order = [i for i in range(PAGES + 1) if i not in in_bad] + list(in_bad)
    outcome = Client(tmp_path, site.spec("data.pack", order=order), None).finish()
    assert assert_sigbus_after_correct_pages(outcome, site.data, order) == in_bad[0]
    assert len(outcome.pages) == PAGES + 1 - per_chunk


@pytest.mark.timeout(30)
def test_truncated_pack_is_refused(site: Site) -> None:
    packed = (site.root / "data.pack").read_bytes()
    (site.root / "cut.pack").write_bytes(packed[: len(packed) - 1000])
    with pytest.raises(StoreError, match=r"not a .*pack"):
        open_store(f"{site.nginx.url}/cut.pack", **site.options())


# --- S3: moto with IAM authentication on ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bucket:
    endpoint: str
    key: str
    secret: str
    data: bytes

    def options(self, key: str | None = None, secret: str | None = None) -> dict[str, Any]:
        return {
            "key": key or self.key, "secret": secret or self.secret,
            "tries": TRIES, "backoff": 5.0, "timeout": TIMEOUT,
            # Not us-east-1: s3fs would send it as a LocationConstraint, which S3 refuses.
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "eu-west-1"},
        }  # fmt: skip


@pytest.fixture
def bucket(tmp_path: Path) -> Iterator[Bucket]:
    import boto3  # type: ignore[import-untyped]

    data = make_payload(SIZE, seed=11)
    with _servers.moto_server(tmp_path / "moto.log") as endpoint:
        setup: dict[str, Any] = dict(endpoint_url=endpoint, region_name="eu-west-1",
                                     aws_access_key_id="testing",
                                     aws_secret_access_key="testing")  # fmt: skip
        # Authentication is off while the test sets up: a user with a key allowed to use S3.
        iam = boto3.client("iam", **setup)
        iam.create_user(UserName="reader")
        iam.put_user_policy(
            UserName="reader", PolicyName="s3",
            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}),
        )  # fmt: skip
        made = iam.create_access_key(UserName="reader")["AccessKey"]
        s3 = boto3.client("s3", **setup)
        s3.create_bucket(
            Bucket="pages", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
        )
        s3.put_object(Bucket="pages", Key="data.bin", Body=data)
        # From here on every request must be signed by a key IAM knows (moto's reset-auth).
        # Not form-encoded (urllib's default): the server reads the raw body.
        request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", b"0", method="POST",
                                         headers={"Content-Type": "text/plain"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200
        yield Bucket(endpoint, made["AccessKeyId"], made["SecretAccessKey"], data)


@pytest.mark.timeout(60)
def test_s3_keys(bucket: Bucket, tmp_path: Path) -> None:
    url = "s3://pages/data.bin"
    refusals = [bucket.options(secret="wrong" + bucket.secret[5:]),
                bucket.options(key="AKIAUNKNOWNKEY000000")]  # fmt: skip
    for options in refusals:
        started = time.monotonic()
        with pytest.raises(StoreError, match="refused the credentials") as caught:
            open_store(url, **options)
        assert caught.value.errno == errno.EACCES
        assert time.monotonic() - started < 3  # not retried (the backoff is 5 s)
    order = list(range(PAGES + 1))
    store = {k: v for k, v in bucket.options().items()}
    store.update(tries=TRIES, backoff=BACKOFF)
    outcome = Client(tmp_path, {"url": url, "store": store, "order": order}, None).finish()
    assert_all_served(outcome, bucket.data, order)
