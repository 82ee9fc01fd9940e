"""Bootstrap helpers for scripts/lake/start.sh (run with the lake venv's python).

  lake_bootstrap.py db DB_URL    create the Rucio schema and the root account
                                 (needs RUCIO_CONFIG naming the same database);
                                 no-op if already done
  lake_bootstrap.py catalogue    create scope, RSEs, protocols, attributes and
                                 limits through the REST API; settings come
                                 from the EDGE_LAKE_* environment variables
  lake_bootstrap.py s3 CFG       register the S3 RSE (EDGE_LAKE_S3_*: https on
                                 the gateway, sign_url=s3) and put its keys
                                 into the server's rse-accounts.cfg CFG

Both are idempotent: running them on an existing lake changes nothing.
"""

import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request


def bootstrap_db(url):
    """Build the schema unless the database already holds the root account.

    A database without it is a half-finished earlier attempt: start again.
    """
    from sqlalchemy import create_engine, exc, inspect, text

    engine = create_engine(url)
    try:
        with engine.connect() as con:
            tables = inspect(con).get_table_names()
            if "accounts" in tables and con.execute(
                    text("SELECT 1 FROM accounts WHERE account = 'root'")).first():
                print("database: already bootstrapped")
                return
    except exc.DatabaseError:
        if engine.dialect.name != "sqlite":
            raise
        tables = ["?"]   # not an SQLite file (a torn write): make it again
    if tables:
        print("database: incomplete, rebuilding")
        if engine.dialect.name == "sqlite":
            engine.dispose()
            os.remove(engine.url.database)
        else:
            with engine.begin() as con:
                con.execute(text("DROP SCHEMA public CASCADE"))
                con.execute(text("CREATE SCHEMA public"))
    engine.dispose()

    from rucio.db.sqla.util import build_database, create_base_vo, create_root_account

    build_database()
    create_base_vo()
    create_root_account()
    print(f"database: schema and root account created ({engine.dialect.name})")


class Api:
    """Minimal Rucio REST client: token auth, JSON bodies, 409 counted as done."""

    def __init__(self, url, account, username, password):
        self.url = url.rstrip("/")
        req = urllib.request.Request(
            self.url + "/auth/userpass",
            headers={
                "X-Rucio-Account": account,
                "X-Rucio-Username": username,
                "X-Rucio-Password": password,
            },
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            self.token = resp.headers["X-Rucio-Auth-Token"]

    def call(self, method, path, body=None, ok_codes=(409,)):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"X-Rucio-Auth-Token": self.token, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            text = err.read().decode(errors="replace")
            if err.code in ok_codes:  # e.g. 409 Duplicate: it is already there
                return err.code, text
            raise SystemExit(f"{method} {path} -> HTTP {err.code}: {text}") from None


def protocol(scheme, port, prefix, impl, priority):
    """One RSE protocol: lan + wan read/write/delete, wan third-party copy.

    root:// gets priority 1 so that Rucio's own tools (reaper deletions,
    `rucio upload`) use it; http is 2 and is chosen explicitly by clients
    (lfns2pfns ?scheme=http).
    """
    p = priority
    return {
        "scheme": scheme,
        "hostname": "127.0.0.1",
        "port": port,
        "prefix": prefix,
        "impl": impl,
        "domains": {
            "lan": {"read": p, "write": p, "delete": p},
            "wan": {
                "read": p,
                "write": p,
                "delete": p,
                "third_party_copy_read": p,
                "third_party_copy_write": p,
            },
        },
    }


def same_protocol(have, want):
    keys = ("hostname", "port", "prefix", "impl")
    if any(str(have.get(k)) != str(want[k]) for k in keys):
        return False
    for domain, ops in want["domains"].items():
        for op, prio in ops.items():
            if (have.get("domains") or {}).get(domain, {}).get(op) != prio:
                return False
    return True


def bootstrap_catalogue():
    env = os.environ
    api = Api(
        env["EDGE_LAKE_RUCIO_URL"],
        env["EDGE_LAKE_RUCIO_ACCOUNT"],
        env["EDGE_LAKE_RUCIO_USERNAME"],
        env["EDGE_LAKE_RUCIO_PASSWORD"],
    )
    account = env["EDGE_LAKE_RUCIO_ACCOUNT"]
    scope = env["EDGE_LAKE_SCOPE"]
    buf = env["EDGE_LAKE_BUF_RSE"]
    lakes = env["EDGE_LAKE_LAKE_RSES"].split()
    root_port = int(env["EDGE_LAKE_XROOTD_PORT"])
    http_port = int(env["EDGE_LAKE_XROOTD_HTTP_PORT"])
    q = urllib.parse.quote

    api.call("POST", f"/scopes/{q(account)}/{q(scope)}")

    for rse in [buf] + lakes:
        # BUF is non-deterministic: the agent registers files where the telescope
        # wrote them (register in place). The lakes use Rucio's hash lfn2pfn.
        body = {"deterministic": False} if rse == buf else None
        api.call("POST", f"/rses/{q(rse)}", body)

        # Directory under /data: EDGE_BUF -> buf, EDGE_LAKE1 -> lake1.
        sub = rse.split("_", 1)[-1].lower()
        wanted = [
            # root:// prefixes need the leading '//': XRootD 5.5.3 rejects the
            # relative path that Rucio builds from '/data/...'.
            protocol("root", root_port, f"//data/{sub}/", "rucio.rse.protocols.xrootd.Default", 1),
            protocol("http", http_port, f"/data/{sub}/", "rucio.rse.protocols.webdav.Default", 2),
        ]
        # A new RSE answers 404 RSEProtocolNotSupported: no protocols yet.
        status, text = api.call("GET", f"/rses/{q(rse)}/protocols", ok_codes=(404,))
        found = json.loads(text) if status == 200 else []  # a list of protocols
        have = {p["scheme"]: p for p in found}
        for want in wanted:
            old = have.get(want["scheme"])
            if old is not None and same_protocol(old, want):
                continue
            if old is not None:  # ports or prefix changed since the last start
                print(f"catalogue: {rse} {want['scheme']} protocol changed, re-registering")
                api.call("DELETE", f"/rses/{q(rse)}/protocols/{want['scheme']}")
            api.call("POST", f"/rses/{q(rse)}/protocols/{want['scheme']}", want)

        attr = "buffer" if rse == buf else "lake"
        api.call("POST", f"/rses/{q(rse)}/attr/{attr}", {"value": True})
        # Without a limit every rule is refused (InsufficientAccountLimit), root too.
        set_limit(api, account, rse)

    print(f"catalogue: scope {scope}, RSEs {buf} {' '.join(lakes)} ready")


def set_limit(api, account, rse):
    """No limit for `account` on `rse`. Rucio 39 and later take it under /accounts; the 38 LTS
    series (and older) only under /accountlimits (405 on the newer path)."""
    q = urllib.parse.quote
    status, _ = api.call("POST", f"/accounts/{q(account)}/limits/local/{q(rse)}", {"bytes": -1}, ok_codes=(405, 409))
    if status == 405:
        api.call("POST", f"/accountlimits/local/{q(account)}/{q(rse)}", {"bytes": -1})


def bootstrap_s3(accounts_cfg):
    """The S3 RSE as Rucio's documentation describes one: a deterministic RSE whose protocol is
    https on the gateway with prefix /<bucket>/, impl gfal.NoRename (a rename would break signed
    URLs), attribute sign_url=s3 with path-style URLs; its keys in rse-accounts.cfg by RSE id."""
    env = os.environ
    api = Api(env["EDGE_LAKE_RUCIO_URL"], env["EDGE_LAKE_RUCIO_ACCOUNT"], env["EDGE_LAKE_RUCIO_USERNAME"],
              env["EDGE_LAKE_RUCIO_PASSWORD"])
    account = env["EDGE_LAKE_RUCIO_ACCOUNT"]
    rse = env["EDGE_LAKE_S3_RSE"]
    port = int(env["EDGE_LAKE_S3_PORT"])
    bucket = env["EDGE_LAKE_S3_BUCKET"]
    q = urllib.parse.quote
    api.call("POST", f"/rses/{q(rse)}")
    want = protocol("https", port, f"/{bucket}/", "rucio.rse.protocols.gfal.NoRename", 1)
    # FTS copies to S3 with its own keys (s3s://), never with signed URLs: no third-party copy here
    for ops in want["domains"].values():
        ops.pop("third_party_copy_read", None)
        ops.pop("third_party_copy_write", None)
    status, text = api.call("GET", f"/rses/{q(rse)}/protocols", ok_codes=(404,))
    have = {p["scheme"]: p for p in (json.loads(text) if status == 200 else [])}
    old = have.get("https")
    if old is None or not same_protocol(old, want):
        if old is not None:
            api.call("DELETE", f"/rses/{q(rse)}/protocols/https")
        api.call("POST", f"/rses/{q(rse)}/protocols/https", want)
    for key, value in (("sign_url", "s3"), ("s3_url_style", "path"), ("skip_upload_stat", True),
                       ("verify_checksum", False), ("strict_copy", True), ("s3", True)):
        api.call("POST", f"/rses/{q(rse)}/attr/{key}", {"value": value})
    set_limit(api, account, rse)

    _, text = api.call("GET", f"/rses/{q(rse)}")
    rse_id = json.loads(text)["id"]
    try:
        with open(accounts_cfg) as fh:
            accounts = json.load(fh)
    except (FileNotFoundError, ValueError):
        accounts = {}
    accounts[rse_id] = {"access_key": env["EDGE_LAKE_S3_ACCESS_KEY"], "secret_key": env["EDGE_LAKE_S3_SECRET_KEY"],
                        "signature_version": "s3v4", "region": "us-east-1"}
    os.makedirs(os.path.dirname(accounts_cfg), exist_ok=True)
    tmp = accounts_cfg + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)   # it holds secret keys
    with os.fdopen(fd, "w") as fh:
        json.dump(accounts, fh, indent=1)
    os.replace(tmp, accounts_cfg)
    print(f"catalogue: S3 RSE {rse} (id {rse_id}) on https://127.0.0.1:{port}/{bucket}/ ready")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "db":
        bootstrap_db(sys.argv[2])
    elif len(sys.argv) == 2 and sys.argv[1] == "catalogue":
        bootstrap_catalogue()
    elif len(sys.argv) == 3 and sys.argv[1] == "s3":
        bootstrap_s3(sys.argv[2])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
