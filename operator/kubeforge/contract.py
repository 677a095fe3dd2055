"""The runtime <-> operator contract: names both sides must agree on, in one place.

The operator renders pods with these env vars, mounts and annotations; the runtime inside the pods reads
them. Neither side spells these strings anywhere else.
"""

from __future__ import annotations

# Operator -> pod
ENV_JOB = "KUBEFORGE_JOB"  # "<namespace>/<name>" of the owning job
ENV_JOB_KIND = "KUBEFORGE_JOB_KIND"  # PretrainJob | ContextExtensionJob | RLJob | InferenceDeployment
ENV_SPEC_FILE = "KUBEFORGE_SPEC_FILE"  # path of the resolved job (JSON) mounted from a ConfigMap
ENV_ATTEMPT = "KUBEFORGE_ATTEMPT"  # gang attempt number, 0-based
ENV_POD_NAME = "KUBEFORGE_POD_NAME"  # downward API metadata.name
ENV_POD_NAMESPACE = "KUBEFORGE_POD_NAMESPACE"  # downward API metadata.namespace
ENV_POD_IP = "KUBEFORGE_POD_IP"  # downward API status.podIP
ENV_PROGRESS_MODE = "KUBEFORGE_PROGRESS"  # "pod-annotation" (default in cluster) | "file:<path>" | "off"
ENV_TERMINATION_LOG = "KUBEFORGE_TERMINATION_LOG"  # defaults to /dev/termination-log
# model.secretRef and data.secretRef, when they differ from checkpoint.secretRef, reach training pods under
# these prefixes (KUBEFORGE_MODEL_AWS_ACCESS_KEY_ID, ...): the model and tokenizer, and the data, are read
# with them; checkpoints with the plain AWS_* variables of checkpoint.secretRef
MODEL_CREDENTIALS_PREFIX = "KUBEFORGE_MODEL_"
DATA_CREDENTIALS_PREFIX = "KUBEFORGE_DATA_"

# Training pods (also for spec.entrypoint scripts; see kubeforge.runtime.sdk)
ENV_CHECKPOINT_URI = "KUBEFORGE_CHECKPOINT_URI"  # spec.checkpoint.uri: where the job's checkpoints live
ENV_RESUME_STEP = "KUBEFORGE_RESUME_STEP"  # last committed step the operator knew of (a hint; absent at first)
ENV_HEARTBEAT_SECONDS = "KUBEFORGE_HEARTBEAT_SECONDS"  # rank 0's launcher reports liveness this often

# Serving pods of an InferenceDeployment: the deployment's own token (a Secret the operator creates, reaching
# engines and router through secretKeyRef). With it set, an engine answers its KV-cache transfer (/kv/*) and
# weight-sync (/kubeforge/v1/*) endpoints, and requests carrying kv_transfer_params, only to callers sending it
# in KV_TOKEN_HEADER; the router and the decode engines send it.
ENV_KV_TOKEN = "KUBEFORGE_KV_TOKEN"
KV_TOKEN_HEADER = "X-Kubeforge-Kv-Token"
KV_TOKEN_SECRET_KEY = "token"

SPEC_MOUNT_DIR = "/etc/kubeforge"
SPEC_FILE_NAME = "job.json"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"

# Pod -> operator
# rank 0 patches this annotation on its own pod with JSON (see kubeforge.runtime.report.Progress)
PROGRESS_ANNOTATION = "kubeforge.dev/progress"
# rank 0's launcher sets this to the time its workers last used CPU, for scripts that report no progress
HEARTBEAT_ANNOTATION = "kubeforge.dev/heartbeat"

# Labels on every child object
LABEL_JOB_NAME = "kubeforge.dev/job-name"
LABEL_JOB_KIND = "kubeforge.dev/job-kind"
LABEL_ROLE = "kubeforge.dev/role"
LABEL_REPLICA_INDEX = "kubeforge.dev/replica-index"
LABEL_ATTEMPT = "kubeforge.dev/attempt"

# Runtime exit codes the operator interprets (sysexits.h where one fits)
EXIT_OK = 0
EXIT_INVALID_SPEC = 78  # EX_CONFIG: the spec is wrong; retrying cannot help -> job Failed at once
REASON_PEER_LOST = "PeerLost"  # termination message reason: a collective lost its connection to another rank
EXIT_PREEMPTED = 143  # 128 + SIGTERM: stopped on request after writing a checkpoint
