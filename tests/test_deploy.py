"""deploy/: the Kubernetes manifests and the BentoCloud deployment file agree with Kubernetes' schema, BentoML's
deployment schema and the service itself (its probe routes, port and traffic settings)."""
from __future__ import annotations


import pytest
import yaml

from service_helpers import PHOTOS, REPO, export_tiny

K8S = REPO / "deploy" / "k8s"
BENTOCLOUD = REPO / "deploy" / "bentocloud.yaml"
OLDEST_KUBERNETES = "1.30"  # the preStop sleep action (docs/DEPLOY.md)


def manifests() -> dict[str, dict]:
    """Every resource under deploy/k8s, by its path relative to that folder."""
    found = {}
    for path in sorted(K8S.rglob("*.yaml")):
        for i, doc in enumerate(d for d in yaml.safe_load_all(path.read_text()) if d):
            found[f"{path.relative_to(K8S)}#{i}"] = doc
    return found


def deployments() -> dict[str, dict]:
    return {name: doc for name, doc in manifests().items() if doc["kind"] == "Deployment"}


def container(deployment: dict) -> dict:
    (main,) = deployment["spec"]["template"]["spec"]["containers"]
    return main


def env(deployment: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(deployment).get("env", [])}


def test_the_expected_resources_are_there():
    kinds = sorted((name.split("#")[0], doc["kind"]) for name, doc in manifests().items())
    assert kinds == [("deployment.yaml", "Deployment"), ("gpu/deployment.yaml", "Deployment"),
                     ("hpa.yaml", "HorizontalPodAutoscaler"),
                     ("optional/hpa-concurrency.yaml", "HorizontalPodAutoscaler"), ("service.yaml", "Service")]


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, "latest"])
def test_manifests_validate_against_the_kubernetes_openapi_schema(version):
    """Strict: an unknown or misspelt field fails too.  Offline: kubernetes-validate bundles the schemas."""
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (pip install -e '.[test]')")
    if version == "latest":
        version = kubernetes_validate.utils.latest_version()
    for name, doc in manifests().items():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{name} against Kubernetes {version}: {err.message} at {'.'.join(map(str, err.path))}")


def test_the_validator_catches_a_misspelt_field():
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (pip install -e '.[test]')")
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    container(deployment)["livenessProbe"]["periodSecond"] = 10
    with pytest.raises(kubernetes_validate.ValidationError, match="periodSecond"):
        kubernetes_validate.validate(deployment, OLDEST_KUBERNETES, strict=True)


def test_the_service_and_autoscalers_reach_the_deployment():
    docs = manifests()
    service = docs["service.yaml#0"]
    for name, deployment in deployments().items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        assert service["spec"]["selector"].items() <= labels.items(), name
        assert deployment["metadata"]["name"] == "orthserve" and "replicas" not in deployment["spec"], name
        ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
        assert service["spec"]["ports"][0]["targetPort"] in ports, name
    for name in ("hpa.yaml#0", "optional/hpa-concurrency.yaml#0"):
        assert docs[name]["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                        "name": "orthserve"}


def test_cpu_and_gpu_variants():
    """CPU: workers x threads fit the CPU limit (a container's CPU affinity shows the whole node). GPU: a GPU
    from the device plugin and no worker count, so the service runs one worker per GPU it is given."""
    cpu, gpu = deployments()["deployment.yaml#0"], deployments()["gpu/deployment.yaml#0"]
    cpu_env, limits = env(cpu), container(cpu)["resources"]["limits"]
    assert "nvidia.com/gpu" not in limits and cpu_env["ORTHSERVE_PROVIDERS"] == "cpu"
    assert int(cpu_env["ORTHSERVE_WORKERS"]) * int(cpu_env["ORTHSERVE_THREADS"]) <= int(limits["cpu"])
    resources = container(gpu)["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
    assert "ORTHSERVE_WORKERS" not in env(gpu) and "ORTHSERVE_PROVIDERS" not in env(gpu)
    for deployment in (cpu, gpu):  # the HPA's CPU utilisation is a share of the request
        assert "cpu" in container(deployment)["resources"]["requests"]


def test_probes_and_port_are_bentoml_s():
    """The probes use the named port, which is BentoML's HTTP port (what a containerized Bento serves on)."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    for name, deployment in deployments().items():
        main = container(deployment)
        ports = {p["name"]: p["containerPort"] for p in main["ports"]}
        assert ports == {"http": BentoMLContainer.http.port.get()}, name
        assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(ports["http"])
        probes = {kind: main[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
        assert {p["port"] for p in probes.values()} == {"http"}, name
        assert (probes["livenessProbe"]["path"], probes["readinessProbe"]["path"]) == ("/livez", "/readyz"), name


def bentocloud() -> dict:
    return yaml.safe_load(BENTOCLOUD.read_text())


def test_the_bentocloud_file_fits_bentoml_s_deployment_schema():
    """The schema `bentoml deploy -f` structures the file into, and no key it would silently drop."""
    import attrs
    from bentoml._internal.cloud.schemas.modelschemas import (DeploymentServiceConfig, DeploymentTargetHPAConf,
                                                              HPAPolicy)
    from bentoml._internal.cloud.schemas.schemasv2 import CreateDeploymentSchema
    from bentoml._internal.utils.cattr import bentoml_cattr

    config = bentocloud()
    schema = bentoml_cattr.structure({**config, "bento": "orthserve:test"}, CreateDeploymentSchema)
    assert set(config) <= set(attrs.fields_dict(CreateDeploymentSchema))
    (name, service), = config["services"].items()
    assert set(service) <= set(attrs.fields_dict(DeploymentServiceConfig))
    assert set(service["scaling"]) <= set(attrs.fields_dict(DeploymentTargetHPAConf))
    assert set(service["scaling"]["policy"]) <= set(attrs.fields_dict(HPAPolicy))
    scaling = schema.services[name].scaling
    assert 0 <= scaling.min_replicas <= scaling.max_replicas and schema.services[name].instance_type
    assert all(e.name.startswith("ORTHSERVE_") for e in schema.services[name].envs)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """The service class, loaded on the tiny exported artifact as the other service tests do."""
    if not PHOTOS.is_dir():
        pytest.skip(f"photos not found at {PHOTOS}")
    artifact = export_tiny(tmp_path_factory.getbasetemp())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ORTHSERVE_MODEL", str(artifact))
        from service import service

        yield service


def test_the_service_declares_its_traffic_for_the_autoscaler(classifier):
    from service.runtime import default_max_batch, serving_gpus

    traffic = classifier.Classifier.config["traffic"]
    assert traffic == classifier.service_config(classifier.WORKERS, serving_gpus(), default_max_batch())["traffic"]
    assert traffic["concurrency"] == classifier.WORKERS * default_max_batch() <= traffic["max_concurrency"]
    assert traffic["timeout"] == 60


def test_traffic_and_gpus_scale_with_the_workers(classifier):
    one, four = classifier.service_config(1, 1, 256), classifier.service_config(4, 4, 256)
    assert one["resources"] == {"gpu": 1} and four["resources"] == {"gpu": 4} and four["workers"] == 4
    assert (one["traffic"]["concurrency"], one["traffic"]["max_concurrency"]) == (256, 256)
    assert (four["traffic"]["concurrency"], four["traffic"]["max_concurrency"]) == (1024, 1024)
    cpu = classifier.service_config(2, 0, 32)
    assert cpu["resources"] == {} and cpu["traffic"]["concurrency"] == 64 and cpu["traffic"]["max_concurrency"] == 256


def test_the_deployments_concurrency_matches_the_service_s(classifier):
    """BentoCloud's override and the optional HPA's target are the service's own figure for a one-GPU replica."""
    gpus = int(container(deployments()["gpu/deployment.yaml#0"])["resources"]["limits"]["nvidia.com/gpu"])
    expected = classifier.service_config(gpus, gpus, 256)["traffic"]
    (service,) = bentocloud()["services"].values()
    assert service["config_overrides"]["traffic"] == expected
    target = manifests()["optional/hpa-concurrency.yaml#0"]["spec"]["metrics"][0]["pods"]["target"]
    assert int(target["averageValue"]) == expected["concurrency"]


def test_the_bentocloud_service_is_the_classifier(classifier):
    assert list(bentocloud()["services"]) == [classifier.Classifier.name]


def test_the_probe_paths_are_the_service_s_health_routes():
    """Each probe path of the manifests is one of BentoML's health routes; that they answer 200 on a running
    server is tested in tests/test_service_server.py (a second ASGI app in this process would register
    BentoML's metrics twice)."""
    paths = {container(d)[kind]["httpGet"]["path"] for d in deployments().values()
             for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert paths == {"/livez", "/readyz"}