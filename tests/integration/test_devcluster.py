"""The dev cluster behaves like Kubernetes where kubeforge relies on it: pod lifecycle and exit codes,
termination messages, graceful deletion, Deployments with readiness probes, garbage collection, GPU
scheduling, cluster DNS, and in-cluster API access with a ServiceAccount token under RBAC.

Runs against $KUBECONFIG when set, else against a dev cluster the `cluster` fixture starts.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from kubeforge.devcluster.podenv import expand, map_arg, map_path
from kubeforge.devcluster.testing import ClusterHandle, wait_for

pytestmark = pytest.mark.integration


# ---------------------------------------------------------------------------------------------- helpers


def _core(cluster: ClusterHandle) -> Any:
    from kubernetes import client

    return client.CoreV1Api(cluster.api_client())


def _pod(name: str, code: str, **spec: Any) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "main", "image": "python:3.11", "command": ["python", "-c", code]}
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": spec.pop("labels", {})},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 10, "containers": [container], **spec},
    }


def _wait_phase(core: Any, ns: str, name: str, phases: tuple[str, ...], timeout: float = 60) -> Any:
    return wait_for(lambda: (p := core.read_namespaced_pod(name, ns)).status.phase in phases and p,
                    timeout, what=f"pod {ns}/{name} in {phases}")


def _events(core: Any, ns: str, name: str) -> list[Any]:
    evs = core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
    return list(evs)


def _gone(core: Any, ns: str, name: str) -> bool:
    from kubernetes.client.rest import ApiException

    try:
        core.read_namespaced_pod(name, ns)
        return False
    except ApiException as e:
        return e.status == 404


# ---------------------------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize(
    ("value", "env", "out"),
    [("$(A)-$(B)", {"A": "1"}, "1-$(B)"), ("$$(A)", {"A": "1"}, "$(A)"), ("x$$y", {}, "x$y")],
)
def test_var_expansion(value: str, env: dict[str, str], out: str) -> None:
    assert expand(value, env) == out


def test_path_mapping() -> None:
    m = {"/etc/kubeforge": "/s/v/spec", "/etc/kubeforge/x": "/s/v/x", "/dev/termination-log": "/s/t"}
    assert map_path("/etc/kubeforge/job.json", m) == "/s/v/spec/job.json"
    assert map_path("/etc/kubeforge/x/a", m) == "/s/v/x/a"
    assert map_path("/etc/kubeforgey", m) == "/etc/kubeforgey"
    assert map_arg("--spec=/etc/kubeforge/job.json", m) == "--spec=/s/v/spec/job.json"
    assert map_arg("/dev/termination-log", m) == "/s/t"


def test_pod_shim_maps_paths_and_resolves_cluster_names(tmp_path: Path) -> None:
    """The sitecustomize shim on its own: mount-path rewriting (incl. no-arg os.listdir) and cluster DNS with
    the pod's search list."""
    import os
    import subprocess

    from kubeforge.devcluster.nodeagent import SHIM_DIR

    host = tmp_path / "vol"
    host.mkdir()
    (host / "job.json").write_text('{"ok": true}')
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.10.5 web.ns1.svc.cluster.local\n127.0.10.6 a.gang.ns1.svc.cluster.local\n")
    code = textwrap.dedent("""
        import json, os, socket
        assert json.load(open('/etc/kubeforge/job.json')) == {'ok': True}
        assert os.listdir('/etc/kubeforge') == ['job.json'] and isinstance(os.listdir(), list)
        assert socket.gethostbyname('web') == '127.0.10.5'
        assert socket.gethostbyname('a.gang.ns1.svc') == '127.0.10.6'
        assert socket.getaddrinfo('a.gang', 80)[0][4][0] == '127.0.10.6'
        try:
            socket.gethostbyname('missing.ns1.svc.cluster.local')
            raise SystemExit('resolved a missing cluster name')
        except socket.gaierror:
            pass
        assert socket.gethostname() == 'pod-0'
    """)
    env = dict(os.environ, PYTHONPATH=str(SHIM_DIR), KUBEFORGE_DEVCLUSTER_HOSTS=str(hosts),
               KUBEFORGE_DEVCLUSTER_NAMESPACE="ns1", KUBEFORGE_DEVCLUSTER_HOSTNAME="pod-0",
               KUBEFORGE_DEVCLUSTER_MOUNTS=json.dumps({"/etc/kubeforge": str(host)}))
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------------------------- pods


def test_pod_succeeds_and_logs(cluster: ClusterHandle, namespace: str) -> None:
    core = _core(cluster)
    code = "import os, socket; print('hello from', os.environ['HOSTNAME'], socket.gethostname())"
    core.create_namespaced_pod(namespace, _pod("ok", code))
    pod = _wait_phase(core, namespace, "ok", ("Succeeded", "Failed"))
    assert pod.status.phase == "Succeeded"
    st = pod.status.container_statuses[0]
    assert st.state.terminated.exit_code == 0
    assert st.state.terminated.reason == "Completed"
    assert pod.status.pod_ip.startswith("127.0.")
    assert pod.spec.node_name.startswith("kubeforge-node-")
    conds = {c.type: c.status for c in pod.status.conditions}
    assert conds["PodScheduled"] == "True" and conds["Initialized"] == "True" and conds["Ready"] == "False"
    if cluster.state_dir is not None:
        assert "hello from ok ok" in cluster.pod_log(namespace, "ok")


def test_pod_fails_with_exit_code_and_termination_message(cluster: ClusterHandle, namespace: str) -> None:
    core = _core(cluster)
    code = textwrap.dedent("""
        import json, sys
        with open('/dev/termination-log', 'w') as f:
            f.write(json.dumps({'error': 'bad spec'}))
        sys.exit(3)
    """)
    init = {"name": "init", "image": "busybox", "command": ["python", "-c", "print('init ran')"]}
    core.create_namespaced_pod(namespace, _pod("bad", code, initContainers=[init]))
    pod = _wait_phase(core, namespace, "bad", ("Succeeded", "Failed"))
    assert pod.status.phase == "Failed"
    term = pod.status.container_statuses[0].state.terminated
    assert term.exit_code == 3
    assert term.reason == "Error"
    assert json.loads(term.message) == {"error": "bad spec"}
    assert pod.status.init_container_statuses[0].state.terminated.exit_code == 0


def test_restart_on_failure_counts_restarts(cluster: ClusterHandle, namespace: str) -> None:
    """OnFailure restarts a failing container; a file in an emptyDir survives the restart."""
    core = _core(cluster)
    code = textwrap.dedent("""
        import os, sys
        p = '/scratch/count'
        n = int(open(p).read()) if os.path.exists(p) else 0
        open(p, 'w').write(str(n + 1))
        sys.exit(0 if n >= 1 else 1)
    """)
    pod = _pod("retry", code, restartPolicy="OnFailure", volumes=[{"name": "scratch", "emptyDir": {}}],
               container={"volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]})
    core.create_namespaced_pod(namespace, pod)
    p = _wait_phase(core, namespace, "retry", ("Succeeded", "Failed"), timeout=60)
    assert p.status.phase == "Succeeded"
    st = p.status.container_statuses[0]
    assert st.restart_count == 1
    assert st.last_state.terminated.exit_code == 1


def test_delete_sends_sigterm_then_removes_pod(cluster: ClusterHandle, namespace: str, tmp_path: Path) -> None:
    core = _core(cluster)
    marker = tmp_path / "got-sigterm"
    code = textwrap.dedent(f"""
        import signal, sys, time
        def on_term(signum, frame):
            open({str(marker)!r}, 'w').write('SIGTERM')
            sys.exit(143)
        signal.signal(signal.SIGTERM, on_term)
        print('ready', flush=True)
        while True:
            time.sleep(0.1)
    """)
    core.create_namespaced_pod(namespace, _pod("victim", code))
    _wait_phase(core, namespace, "victim", ("Running",))
    time.sleep(0.5)  # let the handler be installed
    t0 = time.monotonic()
    core.delete_namespaced_pod("victim", namespace)
    wait_for(lambda: _gone(core, namespace, "victim"), 30, what="pod removed")
    assert marker.read_text() == "SIGTERM"
    assert time.monotonic() - t0 < 10  # exited on SIGTERM, not after the grace period


def test_missing_secret_keeps_pod_waiting(cluster: ClusterHandle, namespace: str) -> None:
    core = _core(cluster)
    env = [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k"}}}]
    core.create_namespaced_pod(namespace, _pod("cfgerr", "print(1)", container={"env": env}))

    def waiting() -> Any:
        p = core.read_namespaced_pod("cfgerr", namespace)
        sts = p.status.container_statuses or []
        return sts and sts[0].state.waiting and sts[0].state.waiting.reason == "CreateContainerConfigError" and p

    p = wait_for(waiting, 30, what="CreateContainerConfigError")
    assert p.status.phase == "Pending"
    # Once the Secret exists the container starts, like the kubelet retrying.
    core.create_namespaced_secret(namespace, {"metadata": {"name": "nope"}, "stringData": {"k": "v"}})
    assert _wait_phase(core, namespace, "cfgerr", ("Succeeded", "Failed")).status.phase == "Succeeded"


def test_env_volumes_and_downward_api(cluster: ClusterHandle, namespace: str) -> None:
    from kubernetes import client

    core = _core(cluster)
    core.create_namespaced_config_map(namespace, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="spec"), data={"job.json": '{"steps": 7}', "MODE": "fast"}))
    code = textwrap.dedent("""
        import json, os
        spec = json.load(open('/etc/kubeforge/job.json'))
        labels = open('/etc/podinfo/labels').read()
        assert spec == {'steps': 7}, spec
        assert 'role="worker"' in labels, labels
        assert os.environ['MODE'] == 'fast'
        assert os.environ['CFG_MODE'] == 'fast'
        assert os.environ['AWS_ENDPOINT_URL'].startswith('http')
        assert os.environ['POD_IP'].startswith('127.0.'), os.environ['POD_IP']
        assert os.environ['ROLE'] == 'worker'
        assert os.environ['WHO'] == 'env-' + os.environ['POD_NAME']
        assert os.environ['CPU_M'] == '500', os.environ['CPU_M']
        assert os.path.isfile(os.environ['SPEC_FILE'])
        assert os.getcwd().endswith('/work'), os.getcwd()
        print('all good')
    """)
    container = {
        "workingDir": "/work",
        "envFrom": [{"configMapRef": {"name": "spec"}}, {"secretRef": {"name": "kubeforge-s3"}},
                    {"prefix": "CFG_", "configMapRef": {"name": "spec"}}],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "ROLE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['role']"}}},
            {"name": "WHO", "value": "env-$(POD_NAME)"},
            {"name": "CPU_M", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1m"}}},
            {"name": "SPEC_FILE", "value": "/etc/kubeforge/job.json"},
        ],
        "resources": {"limits": {"nvidia.com/gpu": "1", "cpu": "500m"}},
        "volumeMounts": [{"name": "spec", "mountPath": "/etc/kubeforge"},
                         {"name": "podinfo", "mountPath": "/etc/podinfo"},
                         {"name": "work", "mountPath": "/work"}],
    }
    volumes = [
        {"name": "spec", "configMap": {"name": "spec", "items": [{"key": "job.json", "path": "job.json"}]}},
        {"name": "podinfo", "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
        {"name": "work", "emptyDir": {}},
    ]
    core.create_namespaced_pod(namespace, _pod("envs", code, container=container, volumes=volumes,
                                               labels={"role": "worker"}))
    p = _wait_phase(core, namespace, "envs", ("Succeeded", "Failed"))
    assert p.status.phase == "Succeeded", cluster.pod_log(namespace, "envs")


# ---------------------------------------------------------------------------------------------- controllers


def _http_server_container(port: int) -> dict[str, Any]:
    return {
        "name": "web", "image": "python:3.11",
        "command": ["python", "-m", "http.server", str(port), "--bind", "$(POD_IP)"],
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "ports": [{"name": "http", "containerPort": port}],
        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
    }


def test_deployment_gets_ready_pods(cluster: ClusterHandle, namespace: str) -> None:
    from kubernetes import client

    apps = client.AppsV1Api(cluster.api_client())
    core = _core(cluster)
    dep = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {
            "replicas": 2, "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}},
                         "spec": {"terminationGracePeriodSeconds": 5, "containers": [_http_server_container(8080)]}},
        },
    }
    apps.create_namespaced_deployment(namespace, dep)
    wait_for(lambda: (apps.read_namespaced_deployment("web", namespace).status.ready_replicas or 0) == 2, 90,
             what="2 ready replicas")
    pods = core.list_namespaced_pod(namespace, label_selector="app=web").items
    assert len(pods) == 2
    assert len({p.status.pod_ip for p in pods}) == 2  # same port, different pod IPs
    # Deleting the owner garbage-collects ReplicaSet and pods (background propagation).
    apps.delete_namespaced_deployment("web", namespace)
    wait_for(lambda: not core.list_namespaced_pod(namespace, label_selector="app=web").items, 60,
             what="pods garbage-collected")
    assert not apps.list_namespaced_replica_set(namespace).items


def test_owner_deletion_garbage_collects_children(cluster: ClusterHandle, namespace: str) -> None:
    from kubernetes import client

    core = _core(cluster)
    owner = core.create_namespaced_config_map(namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner")))
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    child = _pod("child", "import time; time.sleep(600)")
    child["metadata"]["ownerReferences"] = [ref]
    core.create_namespaced_pod(namespace, child)
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "child-cm", "ownerReferences": [ref]}})
    _wait_phase(core, namespace, "child", ("Running",))
    core.delete_namespaced_config_map("owner", namespace)
    wait_for(lambda: _gone(core, namespace, "child"), 60, what="child pod collected")
    wait_for(lambda: not [c for c in core.list_namespaced_config_map(namespace).items
                          if c.metadata.name == "child-cm"], 30, what="child ConfigMap collected")


def test_gpu_requests_are_scheduled_against_node_allocatable(cluster: ClusterHandle, namespace: str) -> None:
    core = _core(cluster)
    def gpus(n: int) -> dict[str, Any]:
        return {"resources": {"limits": {"nvidia.com/gpu": str(n)}}}

    core.create_namespaced_pod(namespace, _pod("two-gpus", "print('ok')", container=gpus(2)))
    core.create_namespaced_pod(namespace, _pod("three-gpus", "print('never')", container=gpus(3)))
    assert _wait_phase(core, namespace, "two-gpus", ("Succeeded",)).spec.node_name

    def failed_scheduling() -> Any:
        return [e for e in _events(core, namespace, "three-gpus")
                if e.reason == "FailedScheduling" and "Insufficient nvidia.com/gpu" in (e.message or "")]

    wait_for(failed_scheduling, 60, what="FailedScheduling event")
    p = core.read_namespaced_pod("three-gpus", namespace)
    assert p.status.phase == "Pending" and not p.spec.node_name


# ---------------------------------------------------------------------------------------------- networking


def test_dns_headless_hostname_and_service_http(cluster: ClusterHandle, namespace: str) -> None:
    """Headless Service: pod hostname records to the pod IP. ClusterIP Service: its ClusterIP, proxied to a
    ready pod with port remapping (80 -> named targetPort 8000). kubernetes.default.svc:443 reaches the API."""
    core = _core(cluster)
    core.create_namespaced_service(namespace, {"metadata": {"name": "workers"}, "spec": {
        "clusterIP": "None", "selector": {"app": "dns-server"}, "ports": [{"name": "http", "port": 8000}]}})
    web = core.create_namespaced_service(namespace, {"metadata": {"name": "web"}, "spec": {
        "selector": {"app": "dns-server"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
    server = {"apiVersion": "v1", "kind": "Pod",
              "metadata": {"name": "server-0", "labels": {"app": "dns-server"}},
              "spec": {"hostname": "server-0", "subdomain": "workers", "terminationGracePeriodSeconds": 2,
                       "containers": [_http_server_container(8000)]}}
    core.create_namespaced_pod(namespace, server)
    ready = wait_for(lambda: (p := core.read_namespaced_pod("server-0", namespace)).status.container_statuses
                     and p.status.container_statuses[0].ready and p, 60, what="server ready")
    code = textwrap.dedent(f"""
        import socket, urllib.request
        ns = {namespace!r}
        pod_ip, svc_ip = {ready.status.pod_ip!r}, {web.spec.cluster_ip!r}
        for host in ('server-0.workers.' + ns + '.svc.cluster.local', 'server-0.workers.' + ns + '.svc',
                     'server-0.workers', 'workers'):
            got = socket.gethostbyname(host)
            assert got == pod_ip, (host, got, pod_ip)
        for host in ('web', 'web.' + ns, 'web.' + ns + '.svc.cluster.local'):
            got = socket.gethostbyname(host)
            assert got == svc_ip, (host, got, svc_ip)
        body = urllib.request.urlopen('http://server-0.workers:8000/', timeout=5).read()
        assert b'Directory listing' in body, body[:200]
        body = urllib.request.urlopen('http://web/', timeout=5).read()  # port 80 -> targetPort 8000
        assert b'Directory listing' in body, body[:200]
        try:
            socket.gethostbyname('nothing-here.' + ns + '.svc.cluster.local')
            raise SystemExit('resolved a name that does not exist')
        except socket.gaierror:
            pass
        socket.create_connection(('kubernetes.default.svc', 443), timeout=5).close()
        print('dns ok')
    """)
    core.create_namespaced_pod(namespace, _pod("client", code))
    p = _wait_phase(core, namespace, "client", ("Succeeded", "Failed"))
    assert p.status.phase == "Succeeded", cluster.pod_log(namespace, "client")
    # The ClusterIP is reachable from the host too (handy for demos: curl the Service).
    import urllib.request

    assert b"Directory listing" in urllib.request.urlopen(f"http://{web.spec.cluster_ip}:80/", timeout=5).read()


def test_in_cluster_client_patches_own_pod_under_rbac(cluster: ClusterHandle, namespace: str) -> None:
    from kubernetes import client

    api = cluster.api_client()
    core = client.CoreV1Api(api)
    rbac = client.RbacAuthorizationV1Api(api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reporter"}})
    rbac.create_namespaced_role(namespace, {"metadata": {"name": "reporter"}, "rules": [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch"]}]})
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "reporter"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reporter"},
        "subjects": [{"kind": "ServiceAccount", "name": "reporter", "namespace": namespace}]})
    code = textwrap.dedent("""
        import json, os
        from kubernetes import client, config
        from kubernetes.client.rest import ApiException
        config.load_incluster_config()
        ns = open('/var/run/secrets/kubernetes.io/serviceaccount/namespace').read()
        core = client.CoreV1Api()
        body = {'metadata': {'annotations': {'kubeforge.dev/progress': json.dumps({'step': 5})}}}
        core.patch_namespaced_pod(os.environ['POD_NAME'], ns, body)
        try:
            core.list_namespaced_secret(ns)
            raise SystemExit('RBAC let a pod list secrets')
        except ApiException as e:
            assert e.status == 403, e.status
        print('patched')
    """)
    env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    core.create_namespaced_pod(namespace, _pod("reporter", code, serviceAccountName="reporter",
                                               container={"env": env}))
    p = _wait_phase(core, namespace, "reporter", ("Succeeded", "Failed"))
    assert p.status.phase == "Succeeded", cluster.pod_log(namespace, "reporter")
    assert json.loads(p.metadata.annotations["kubeforge.dev/progress"]) == {"step": 5}


def test_s3_bucket_and_secret(cluster: ClusterHandle, namespace: str) -> None:
    s3 = cluster.s3_client()
    s3.put_object(Bucket=cluster.s3_bucket, Key=f"{namespace}/hello.txt", Body=b"hi")
    assert s3.get_object(Bucket=cluster.s3_bucket, Key=f"{namespace}/hello.txt")["Body"].read() == b"hi"
    sec = _core(cluster).read_namespaced_secret("kubeforge-s3", namespace)
    assert set(sec.data) >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"}


def test_start_process_helper(cluster: ClusterHandle, tmp_path: Path) -> None:
    """The generic process helper (used for the operator) runs argv with KUBECONFIG pointing here."""
    out = tmp_path / "out.txt"
    code = (f"import json, os, time; json.dump([os.environ['KUBECONFIG'], 'AWS_SECRET_ACCESS_KEY' in os.environ], "
            f"open({str(out)!r}, 'w')); time.sleep(60)")
    with cluster.start_process([sys.executable, "-c", code], name="probe-process"):
        wait_for(lambda: out.exists() and out.read_text(), 20, what="process output")
    # KUBECONFIG yes; S3 credentials no (the operator holds no data credentials) unless passed in env
    assert json.loads(out.read_text()) == [str(cluster.kubeconfig), False]


def test_native_resolver_reaches_torch_tcpstore_by_hostname(cluster: ClusterHandle, namespace: str) -> None:
    """torch's c10d TCPStore resolves MASTER_ADDR in C++ (libc getaddrinfo), not through Python's socket
    module: the gang rendezvous over a headless Service must work for native code too."""
    pytest.importorskip("torch")
    core = _core(cluster)
    core.create_namespaced_service(namespace, {"metadata": {"name": "gang"}, "spec": {
        "clusterIP": "None", "publishNotReadyAddresses": True, "selector": {"app": "gang"},
        "ports": [{"name": "store", "port": 29531}]}})
    master = textwrap.dedent("""
        import os, datetime
        import torch.distributed as dist
        s = dist.TCPStore(os.environ['POD_IP'], 29531, 2, True, timeout=datetime.timedelta(seconds=90))
        s.set('greeting', 'hello')
        s.wait(['done'])
        print('worker said', s.get('done'))
    """)
    worker = textwrap.dedent("""
        import datetime
        import torch.distributed as dist
        s = dist.TCPStore('master-0.gang', 29531, 2, False, timeout=datetime.timedelta(seconds=90))
        assert s.get('greeting') == b'hello'
        s.set('done', 'yes')
    """)
    env = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    core.create_namespaced_pod(namespace, _pod("master-0", master, hostname="master-0", subdomain="gang",
                                               labels={"app": "gang"}, container={"env": env}))
    core.create_namespaced_pod(namespace, _pod("worker-1", worker))
    for name in ("worker-1", "master-0"):
        p = _wait_phase(core, namespace, name, ("Succeeded", "Failed"), timeout=120)
        assert p.status.phase == "Succeeded", cluster.pod_log(namespace, name)


def test_admission_webhook_served_by_a_pod_through_its_service(cluster: ClusterHandle, namespace: str,
                                                               tmp_path: Path) -> None:
    """The API server calls a validating webhook registered by Service (ClusterIP, port 443 -> 8443)."""
    if cluster.state_dir is None:
        pytest.skip("needs the dev cluster's CA to issue the webhook's serving cert")
    import base64

    from kubernetes import client
    from kubernetes.client.rest import ApiException

    from kubeforge.devcluster.pki import sign_serving_cert

    api = cluster.api_client()
    core = client.CoreV1Api(api)
    adm = client.AdmissionregistrationV1Api(api)
    crt, key = sign_serving_cert(cluster.state_dir / "pki", tmp_path, [f"hook.{namespace}.svc"], [])
    core.create_namespaced_secret(namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name="hook-tls"), string_data={"tls.crt": crt.read_text(), "tls.key": key.read_text()}))
    core.create_namespaced_service(namespace, {"metadata": {"name": "hook"}, "spec": {
        "selector": {"app": "hook"}, "ports": [{"port": 443, "targetPort": 8443}]}})
    server = textwrap.dedent("""
        import http.server, json, os, ssl
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200); self.end_headers(); self.wfile.write(b'ok')
            def do_POST(self):
                review = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
                req = review['request']
                labels = (req['object'].get('metadata') or {}).get('labels') or {}
                allowed = labels.get('deny') != 'true'
                resp = {'uid': req['uid'], 'allowed': allowed}
                if not allowed:
                    resp['status'] = {'code': 403, 'message': 'denied by the test webhook'}
                body = json.dumps({'apiVersion': 'admission.k8s.io/v1', 'kind': 'AdmissionReview',
                                   'response': resp}).encode()
                self.send_response(200)
                self.send_header('Content-Type', 'application/json')
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                self.wfile.write(body)
        srv = http.server.ThreadingHTTPServer((os.environ['POD_IP'], 8443), H)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain('/tls/tls.crt', '/tls/tls.key')
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
        srv.serve_forever()
    """)
    pod = _pod("hook", server, restartPolicy="Always", labels={"app": "hook"}, container={
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "volumeMounts": [{"name": "tls", "mountPath": "/tls"}],
        "readinessProbe": {"httpGet": {"port": 8443, "scheme": "HTTPS", "path": "/"}, "periodSeconds": 1}})
    pod["spec"]["volumes"] = [{"name": "tls", "secret": {"secretName": "hook-tls"}}]
    core.create_namespaced_pod(namespace, pod)
    wait_for(lambda: (p := core.read_namespaced_pod("hook", namespace)).status.container_statuses
             and p.status.container_statuses[0].ready, 60, what="webhook pod ready")
    core.patch_namespace(namespace, {"metadata": {"labels": {"webhook-test": namespace}}})
    ca = base64.b64encode((cluster.state_dir / "pki" / "ca.crt").read_bytes()).decode()
    cfg_name = f"deny-{namespace}"
    adm.create_validating_webhook_configuration({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": cfg_name},
        "webhooks": [{
            "name": "deny.kubeforge.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "failurePolicy": "Fail", "timeoutSeconds": 5,
            "clientConfig": {"caBundle": ca, "service": {"namespace": namespace, "name": "hook", "path": "/validate"}},
            "namespaceSelector": {"matchLabels": {"webhook-test": namespace}},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                       "resources": ["configmaps"]}],
        }],
    })
    try:
        def denied() -> bool:
            try:
                core.create_namespaced_config_map(namespace, {"metadata": {
                    "generateName": "bad-", "labels": {"deny": "true"}}})
                return False
            except ApiException as e:
                return e.status == 403 and "denied by the test webhook" in e.body

        wait_for(denied, 30, interval=0.5, what="webhook to deny")
        core.create_namespaced_config_map(namespace, {"metadata": {"name": "fine"}})
    finally:
        adm.delete_validating_webhook_configuration(cfg_name)


def test_failing_liveness_probe_restarts_the_container(cluster: ClusterHandle, namespace: str) -> None:
    core = _core(cluster)
    probe = {"tcpSocket": {"port": 1}, "periodSeconds": 1, "failureThreshold": 2}
    core.create_namespaced_pod(namespace, _pod("unhealthy", "import time; time.sleep(600)", restartPolicy="Always",
                                               terminationGracePeriodSeconds=1, container={"livenessProbe": probe}))

    def restarted() -> bool:
        sts = core.read_namespaced_pod("unhealthy", namespace).status.container_statuses or []
        return bool(sts) and sts[0].restart_count >= 1

    wait_for(restarted, 60, what="a restart after liveness failures")
    reasons = {e.reason for e in _events(core, namespace, "unhealthy")}
    assert {"Unhealthy", "Killing"} <= reasons, reasons


def test_pods_bind_the_same_wildcard_port_and_share_localhost_within_a_pod(cluster: ClusterHandle,
                                                                            namespace: str) -> None:
    """Each pod behaves as if it had its own network namespace: two pods serve 0.0.0.0:8130 side by side,
    and the containers of one pod reach each other over localhost."""
    core = _core(cluster)
    serve = {"name": "web", "image": "python:3.11", "command": ["python", "-m", "http.server", "8130"],
             "readinessProbe": {"tcpSocket": {"port": 8130}, "periodSeconds": 1}}
    for name in ("wild-a", "wild-b"):
        core.create_namespaced_pod(namespace, {"metadata": {"name": name}, "spec": {
            "terminationGracePeriodSeconds": 2, "containers": [serve]}})
    ips = []
    for name in ("wild-a", "wild-b"):
        p = wait_for(lambda n=name: (p := core.read_namespaced_pod(n, namespace)).status.container_statuses
                     and p.status.container_statuses[0].ready and p, 60, what=f"{name} ready")
        ips.append(p.status.pod_ip)
    import urllib.request

    for ip in ips:
        assert b"Directory listing" in urllib.request.urlopen(f"http://{ip}:8130/", timeout=5).read()
    sidecar = textwrap.dedent("""
        import time, urllib.request
        for _ in range(100):
            try:
                body = urllib.request.urlopen('http://localhost:8131/', timeout=2).read()
                break
            except OSError:
                time.sleep(0.2)
        assert b'Directory listing' in body
    """)
    core.create_namespaced_pod(namespace, {"metadata": {"name": "local"}, "spec": {
        "restartPolicy": "Never", "terminationGracePeriodSeconds": 1, "containers": [
            {"name": "server", "image": "x", "command": ["python", "-m", "http.server", "8131", "--bind", "127.0.0.1"]},
            {"name": "client", "image": "x", "command": ["python", "-c", sidecar]},
        ]}})

    def client_done() -> Any:
        p = core.read_namespaced_pod("local", namespace)
        sts = {s.name: s for s in p.status.container_statuses or []}
        return "client" in sts and sts["client"].state.terminated

    term = wait_for(client_done, 60, what="sidecar client finished")
    assert term.exit_code == 0, cluster.pod_log(namespace, "local", "client")


def test_repo_crds_are_installed_and_established(cluster: ClusterHandle) -> None:
    import yaml
    from kubernetes import client

    files = sorted((Path(__file__).resolve().parents[2] / "crds").glob("*.yaml"))
    if not files:
        pytest.skip("no CRDs generated yet")
    names = [d["metadata"]["name"] for f in files for d in yaml.safe_load_all(f.read_text())
             if d and d.get("kind") == "CustomResourceDefinition"]
    assert cluster.install_crds(*files) == names  # create-or-replace is idempotent
    ext = client.ApiextensionsV1Api(cluster.api_client())
    for name in names:
        conds = {c.type: c.status for c in ext.read_custom_resource_definition(name).status.conditions}
        assert conds.get("Established") == "True", name
