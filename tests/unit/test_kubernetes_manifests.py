"""deploy/kubernetes/*.yaml: valid against the Kubernetes API schemas, and consistent with
each other, with deploy/Containerfile and with the rules file format.

Validation is offline: kubernetes-validate ships the OpenAPI schemas of each release.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import kubernetes_validate
import pytest
import yaml

from regrewrite.rules import RulesError, load_rules

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
# Oldest Kubernetes release still supported upstream when this was written; the manifests
# use nothing newer (policy/v1 PDB, networking.k8s.io/v1 Ingress, seccompProfile).
KUBERNETES_VERSION = "1.30.0"
MEASURED_PEAK_RSS_MIB = 150  # README: 141-150 MB under load on Python 3.13 (the image's)


def _documents() -> list[tuple[str, dict]]:
    docs = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def _one(kind: str) -> dict:
    found = [doc for _, doc in _documents() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _pod() -> dict:
    return _one("Deployment")["spec"]["template"]


def _container() -> dict:
    containers = _pod()["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _containerfile_entrypoint() -> list[str]:
    text = (DEPLOY / "Containerfile").read_text().replace("\\\n", " ")
    m = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M)
    assert m, "no exec-form ENTRYPOINT in deploy/Containerfile"
    return yaml.safe_load(m.group(1))


def _option(args: list[str], name: str) -> str | None:
    """The value of `--set name=value` in an argument list (the last one wins)."""
    value = None
    for flag, arg in zip(args, args[1:], strict=False):
        if flag == "--set" and arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def test_every_manifest_file_is_there():
    kinds = sorted(doc["kind"] for _, doc in _documents())
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "Ingress",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "Secret",
        "Service",
    ]


def test_the_blob_cache_is_on_a_volume_every_replica_shares():
    from regrewrite.blobcache import parse_size

    c, pod = _container(), _pod()
    directory = PurePosixPath(_option(c["args"], "registry_cache_dir"))
    mounts = [m for m in c["volumeMounts"] if directory.is_relative_to(m["mountPath"])]
    assert len(mounts) == 1 and not mounts[0].get("readOnly"), c["volumeMounts"]
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mounts[0]["name"]]
    claim = _one("PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    # Replicas on different nodes write at once: only ReadWriteMany allows it.
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert _one("Deployment")["spec"]["replicas"] > 1
    size = claim["spec"]["resources"]["requests"]["storage"]
    m = re.fullmatch(r"(\d+)Gi", size)
    assert m, size
    cap = parse_size(_option(c["args"], "registry_cache_max_bytes"))
    assert cap < int(m.group(1)) << 30  # room for blobs in flight above the cap


@pytest.mark.parametrize(
    "name,doc", _documents(), ids=[f"{n}:{d['kind']}" for n, d in _documents()]
)
def test_manifest_is_valid_kubernetes(name, doc):
    # strict: unknown fields (a typo such as `readinesProbe`) are errors, not ignored.
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_validation_rejects_a_broken_manifest():
    # The validator really checks: a misspelt field and a wrong type both fail.
    doc = _one("Deployment")
    broken = yaml.safe_load(yaml.safe_dump(doc))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    broken = yaml.safe_load(yaml.safe_dump(doc))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_deployment_replicas_and_probes():
    assert _one("Deployment")["spec"]["replicas"] >= 2
    c = _container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == 5000
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    # The image listens on 5000 (its ENTRYPOINT), and the metrics option matches the port.
    entrypoint = _containerfile_entrypoint()
    assert entrypoint[entrypoint.index("--listen-port") + 1] == "5000"
    assert _option(c["args"], "registry_metrics").endswith(f":{ports['metrics']}")


def test_resources_fit_the_measured_memory():
    res = _container()["resources"]
    mib = {"Mi": 1, "Gi": 1024}

    def to_mib(q: str) -> int:
        m = re.fullmatch(r"(\d+)(Mi|Gi)", q)
        assert m, q
        return int(m.group(1)) * mib[m.group(2)]

    request, limit = to_mib(res["requests"]["memory"]), to_mib(res["limits"]["memory"])
    assert MEASURED_PEAK_RSS_MIB < request <= limit
    assert limit >= 2 * MEASURED_PEAK_RSS_MIB  # headroom: an OOM kill drops every transfer
    assert res["requests"]["cpu"] and res["limits"]["cpu"]


def test_runs_as_the_images_non_root_user_read_only():
    pod = _pod()["spec"]
    c = _container()
    text = (DEPLOY / "Containerfile").read_text()
    user = re.search(r"^USER (\d+):(\d+)$", text, re.M)
    assert user, "the Containerfile must name a numeric non-root user"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(user.group(1)) != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # mitmproxy writes its confdir: it must be on a writable volume.
    confdir = PurePosixPath(_option(c["args"], "confdir"))
    writable = {
        m["mountPath"]
        for m in c["volumeMounts"]
        if not m.get("readOnly")
        and any(v["name"] == m["name"] and "emptyDir" in v for v in pod["volumes"])
    }
    assert any(confdir.is_relative_to(w) for w in writable), (confdir, writable)


def test_rules_configmap_is_mounted_as_a_directory():
    c = _container()
    rules_path = PurePosixPath(_option(_containerfile_entrypoint(), "registry_rules"))
    assert _option(c["args"], "registry_rules") is None  # the image's path is used
    cm = _one("ConfigMap")
    volumes = {v["name"]: v for v in _pod()["spec"]["volumes"]}
    mounts = [m for m in c["volumeMounts"] if m["mountPath"] == str(rules_path.parent)]
    assert len(mounts) == 1, c["volumeMounts"]
    mount = mounts[0]
    # subPath mounts never see ConfigMap updates (the kubelet swaps the ..data symlink of
    # the volume directory): the hot reload would silently stop working.
    assert "subPath" not in mount and "subPathExpr" not in mount
    assert volumes[mount["name"]]["configMap"]["name"] == cm["metadata"]["name"]
    assert rules_path.name in cm["data"]


def test_configmap_rules_load_with_the_secret_mounted(tmp_path):
    """The shipped rules.yaml is a valid rules file once the Secret is where the
    Deployment mounts it (rules loading checks that password files are readable)."""
    c = _container()
    secret = _one("Secret")
    volumes = {v["name"]: v for v in _pod()["spec"]["volumes"]}
    (mount,) = [
        m
        for m in c["volumeMounts"]
        if volumes[m["name"]].get("secret", {}).get("secretName") == secret["metadata"]["name"]
    ]
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    for key, value in secret["stringData"].items():
        (secret_dir / key).write_text(value)
    text = _one("ConfigMap")["data"]["rules.yaml"]
    assert mount["mountPath"] + "/" in text, "rules.yaml reads no file from the Secret"
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(text.replace(mount["mountPath"], str(secret_dir)))
    rules = load_rules(rules_file)
    assert rules.names.rules
    # The file names a key the Secret really has.
    for key in secret["stringData"]:
        (secret_dir / key).unlink()
    with pytest.raises(RulesError, match="cannot read"):
        load_rules(rules_file)


def test_service_and_pdb_select_the_pods():
    labels = _pod()["metadata"]["labels"]
    service = _one("Service")["spec"]
    assert service["selector"].items() <= labels.items()
    names = {p["name"] for p in _container()["ports"]}
    assert {p["targetPort"] for p in service["ports"]} <= names
    pdb = _one("PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    # It allows a drain (one pod at a time) without ever taking every replica.
    assert (
        pdb.get("maxUnavailable") == 1
        or pdb.get("minAvailable", 0) < (_one("Deployment")["spec"]["replicas"])
    )


def test_ingress_reaches_the_service_and_the_token_endpoint():
    ingress = _one("Ingress")["spec"]
    service = _one("Service")
    token_path = yaml.safe_load(_one("ConfigMap")["data"]["rules.yaml"]).get("token_path", "/auth")
    paths = {}
    for rule in ingress["rules"]:
        for p in rule["http"]["paths"]:
            paths[p["path"]] = p["backend"]["service"]
    assert set(paths) == {"/v2/", token_path, "/blobs/"}
    for backend in paths.values():
        assert backend["name"] == service["metadata"]["name"]
        assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    assert ingress["tls"], "the ingress terminates TLS"
    # The replicas trust forwarded headers from some range, or the realm would be wrong.
    assert _option(_container()["args"], "registry_trusted_proxies")


def test_cache_hits_are_routed_to_the_blob_servers():
    """registry_cache_serve=public redirects hits to /blobs/ on the public address: the
    ingress must send that path to the port the blob servers listen on, or every warm
    pull fails on its first layer."""
    args = _container()["args"]
    assert _option(args, "registry_cache_serve") == "public"
    (port,) = [p for p in _container()["ports"] if p["name"] == "blobs"]
    assert port["containerPort"] == int(_option(args, "registry_cache_port"))
    service = {p["name"]: p for p in _one("Service")["spec"]["ports"]}
    routes = {
        p["path"]: (p["pathType"], p["backend"]["service"]["port"]["name"])
        for rule in _one("Ingress")["spec"]["rules"]
        for p in rule["http"]["paths"]
    }
    assert routes["/blobs/"] == ("Prefix", "blobs")
    assert service["blobs"]["targetPort"] == "blobs"


def test_every_option_the_deployment_and_image_set_exists():
    """A misspelt `--set` would stop the pods at start-up: each name must be an option of
    mitmdump or of one of the addons `registry_rewrite.addons` composes."""
    from mitmproxy.options import Options
    from mitmproxy.test import taddons

    import registry_rewrite

    names = set()
    for args in (_containerfile_entrypoint(), _container()["args"]):
        pairs = zip(args, args[1:], strict=False)
        names |= {arg.split("=", 1)[0] for flag, arg in pairs if flag == "--set"}
    assert {"registry_rules", "registry_trusted_proxies", "confdir"} <= names
    from mitmproxy.addons.dumper import Dumper

    # (Dumper: mitmdump's own addon, whose flow_detail the Deployment sets)
    fresh = [type(a)() for a in registry_rewrite.addons] + [Dumper()]
    with taddons.context(*fresh, options=Options()) as tctx:
        known = set(tctx.options.keys())
    assert names <= known, sorted(names - known)
