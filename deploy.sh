#!/usr/bin/env bash
# Deploy covalent-gcpbatch-plugin to a Google Cloud project, and point Covalent at it.
#
#   ./deploy.sh up     --project P [--region R] [--prefix X] [options]
#   ./deploy.sh status --project P [--region R] [--prefix X]
#   ./deploy.sh image  --project P [--region R] [--prefix X] --name N --requirements FILE
#   ./deploy.sh down   --project P [--region R] [--prefix X] [--yes]
#
# `up` is idempotent: every resource is looked up before it is created, so a second `up` changes
# nothing, and an interrupted one can simply be run again. See README.md, "Deploy to Google Cloud",
# and `./deploy.sh --help`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly ROOT
readonly APIS=(
  batch.googleapis.com compute.googleapis.com storage.googleapis.com pubsub.googleapis.com
  cloudfunctions.googleapis.com run.googleapis.com eventarc.googleapis.com
  cloudbuild.googleapis.com artifactregistry.googleapis.com logging.googleapis.com
  iam.googleapis.com
)
# iam.googleapis.com: `up` creates service accounts, which a fresh project refuses until the IAM
# API is enabled ("IAM API has not been used in project ...").
# iam before image: the build runs as the build account, which needs its roles first.
readonly UP_STEPS=(apis bucket repo topic accounts iam image function config)
readonly DOWN_STEPS=(config function iam accounts topic repo bucket)
readonly FINALIZED=google.cloud.storage.object.v1.finalized
readonly ENTRY_POINT=on_task_uploaded
# gcloud's messages for a resource that does not exist (anything else a lookup hits is fatal).
readonly NOT_FOUND='not[ _]?found|404|does not exist|manifest unknown'

# The function's size, for a burst of 1,000 electrons (1,000 task uploads within seconds into the
# task bucket, which holds nothing else: one invocation per task, one more per pack). One event
# costs a few ms of CPU and waits on I/O: a few GCS reads, then Batch's CreateJob (up to 60 s of
# retries when Batch throttles: functions/main.py CREATE_RETRY_S). So: 20 instances x 50 requests
# each = 1,000 events in flight, a whole burst even if Batch holds every create for its minute,
# and no delivery refused for want of an instance (Eventarc would redeliver it later, with backoff).
# Concurrency > 1 needs >= 1 vCPU (Cloud Run functions docs); the Python runtime serves as many
# requests at once as it has threads (functions-framework's gunicorn: THREADS, default 4 per CPU),
# so THREADS = concurrency. 512 MiB: the function imports in ~90 MiB (measured), plus 50 threads.
# Batch admits 6,000 mutations/min/region whatever the function does: more would add only cost.
readonly FUNCTION_CPU=1 FUNCTION_MEMORY=512Mi FUNCTION_CONCURRENCY=50 FUNCTION_MAX_INSTANCES=20

# A fresh project's first `up` uses grants seconds after making them (and Eventarc's service agent
# gets its own permissions only when Eventarc is first used): the function's deploy and the image
# build then fail until IAM has propagated, for minutes (terraform-provider-google #25294). Those
# failures, and only those, are retried: after RETRY_BASE_S, doubling up to 6x, while the waits add
# up to at most 60x (10 s: 10, 20, 40, then 60 s; 12 attempts, 550 s of waiting in all). The base
# can be lowered for tests (COVALENT_GCPBATCH_DEPLOY_RETRY_BASE_S, whole seconds).
RETRY_BASE_S=${COVALENT_GCPBATCH_DEPLOY_RETRY_BASE_S:-10}
readonly RETRY_MAX_STEP=6 RETRY_BUDGET=60
# gcloud functions deploy's errors while grants propagate: the Eventarc service agent's (Eventarc's
# own text); the Cloud Storage agent's pubsub.publisher grant (made by the iam step); the function's
# build, as the build account, reading Cloud Functions' copy of the source (the iam step's
# conditional grant, terraform-provider-google #20571) or missing any other of its grants.
readonly FUNCTION_PROPAGATION='necessary permissions are propagated|unable to publish to Cloud Pub/Sub topics|Access to bucket gcf-v2-sources-[0-9]+-[a-z0-9-]+ denied|missing permission on the build service account'
# gcloud builds submit's: the build account cannot read the staged source yet (the build is not
# created), or the build ran and could not fetch the source, push the image or write its logs
# (its failureInfo.type; LOGGING_FAILURE is "Backend logging failures. Should retry." in the API).
readonly BUILD_SOURCE_PROPAGATION='could not resolve source: .*does not have storage\.objects\.get access'
readonly BUILD_FAILURE_PROPAGATION='FETCH_SOURCE_FAILED|PUSH_NOT_AUTHORIZED|LOGGING_FAILURE'

usage() {
  cat <<EOF
Usage: ./deploy.sh up|down|status|image --project P [options]

  up       create (or complete) the deployment and write [executors.gcpbatch] in the Covalent config
  status   show which of the deployment's resources and roles exist
  image    build a worker image with your packages (--name N --requirements FILE) into the
           deployment's repository; tasks use it with container_image_uri
  down     delete what up created (asks first; --yes to skip; without a terminal it needs --yes)

Options (environment fallbacks in parentheses):
  --project P              Google Cloud project id (GCPBATCH_PROJECT)
  --region R               region for the bucket, function, registry and jobs (GCPBATCH_REGION; us-east1)
  --prefix X               names every resource (GCPBATCH_PREFIX; covalent-gcpbatch)
  --bucket B               bucket of the tasks' results and logs (default: <prefix>-<project>)
  --task-bucket B          bucket of the task objects, the function's trigger: nothing else is
                           written there (default: <prefix>-tasks-<project>)
  --python PY              python of the environment you dispatch from: the worker image gets its
                           Python and covalent versions (GCPBATCH_PYTHON; python3)
  --retention-days N       delete task objects (under covalent-gcpbatch/) after N days (7)
  --function-runtime RT    Cloud Functions runtime (python311)
  --max-vcpus N, --max-memory-mb N, --max-time-limit-s N, --max-accelerator-count N,
  --max-boot-disk-size-gb N, --max-scratch-disk-gb N, --max-parallel-vcpus N,
  --allowed-machine-types T1,T2
                           caps the function enforces on every task (defaults: deployment.py)
  --max-keep-warm-s N, --max-warm-vms N, --warm-lifetime-s N
                           warm VMs (keep_warm): longest wait for another electron (0: none), most
                           VMs waiting at once, longest life of a warm VM's job (defaults: deployment.py)
  --allowed-mount-buckets B1,B2, --allowed-writable-mount-buckets B1,B2
                           buckets tasks may mount (gcs_volumes) read-only, or read-write; the
                           jobs' account gets objectViewer, or objectUser, on these buckets only
  --allowed-secrets projects/P/secrets/S1,...
                           Secret Manager secrets tasks may read (secrets), by full name; the jobs'
                           account gets secretAccessor on each of these secrets only
  --allowed-images I1,I2   images a task may run (default: every worker image in the deployment's
                           repository, <region>-docker.pkg.dev/<project>/<prefix>/worker*)
  --name N, --requirements FILE
                           image: the image is worker-N, with FILE's packages (pip requirements)
  --covalent-conf FILE     write the deployment's settings to FILE ([gcpbatch], for
                           covalent deploy up gcpbatch) instead of the Covalent config
  --only STEP[,STEP...]    run only these steps (up: ${UP_STEPS[*]};
                           down: ${DOWN_STEPS[*]})
  --yes, -y                do not ask before deleting (down)
EOF
}

die() {
  printf 'deploy.sh: %s\n' "$*" >&2
  exit 1
}

section() { printf '\n== %s  [%ss]\n' "$*" "$SECONDS"; }  # with the seconds since the start
present() { printf '   exists: %s\n' "$*"; }

# run CMD...: a command that changes something, echoed before it runs.
run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  "$@"
}

# run_retrying CMD...: for IAM changes, which can fail for a little while after an account is created.
run_retrying() {
  local attempt
  for attempt in 1 2 3 4 5; do
    if run "$@"; then
      return 0
    fi
    [ "$attempt" -lt 5 ] || return 1
    printf '   (retrying in %s s: new service accounts take a moment to propagate)\n' $((attempt * 5))
    sleep $((attempt * 5))
  done
}

# run_propagating CHECK CMD...: run CMD (echoed, its output shown as it comes); if it fails and
# CHECK, given a file with CMD's stderr, says that the failure is one of IAM propagation, wait and
# run it again (RETRY_BASE_S...). Any other failure, or one that outlasts the retries, ends it with
# gcloud's own message (already shown) and CMD's exit status.
run_propagating() {
  local check=$1
  shift
  local rc step=1 spent=0 attempt=1
  while :; do
    rc=0
    { run "$@" 2>&1 1>&3 | tee "$WORK/attempt.stderr" >&2; } 3>&1 || rc=$?
    [ "$rc" -ne 0 ] || return 0
    "$check" "$WORK/attempt.stderr" || return "$rc"
    if [ $((spent + step)) -gt "$RETRY_BUDGET" ]; then
      printf 'deploy.sh: still failing after %s attempts (%s s of waiting): IAM changes can take longer to apply; run up again later\n' \
        "$attempt" $((spent * RETRY_BASE_S)) >&2
      return "$rc"
    fi
    printf '   (attempt %s failed while new permissions propagate: retrying in %s s)\n' "$attempt" $((step * RETRY_BASE_S))
    sleep $((step * RETRY_BASE_S))
    spent=$((spent + step)) attempt=$((attempt + 1)) step=$((step * 2))
    [ "$step" -le "$RETRY_MAX_STEP" ] || step=$RETRY_MAX_STEP
  done
}

# function_propagating STDERR: the function's deploy failed while grants propagate.
# shellcheck disable=SC2317  # called through run_propagating
function_propagating() {
  grep -qiE "$FUNCTION_PROPAGATION" "$1"
}

# build_propagating STDERR: the image build failed while the build account's grants propagate
# (a failed Dockerfile step, USER_BUILD_STEP, is not retried).
# shellcheck disable=SC2317  # called through run_propagating
build_propagating() {
  grep -qiE "$BUILD_SOURCE_PROPAGATION" "$1" && return 0
  local id
  id=$(sed -nE 's/.*build ([0-9a-zA-Z-]+) completed with status "FAILURE".*/\1/p' "$1" | tail -n 1)
  [ -n "$id" ] || return 1
  lookup gcloud builds describe "$id" --region="$REGION" --project="$PROJECT" --format='value(failureInfo.type)' || return 1
  grep -qxE "$BUILD_FAILURE_PROPAGATION" <<<"$FOUND"
}

# lookup CMD...: a read-only gcloud command. Its output goes to $FOUND; returns 1 if gcloud says the
# resource does not exist. Any other failure (permission, API disabled) stops the script.
FOUND=""
lookup() {
  local rc=0
  FOUND=$("$@" 2>"$WORK/stderr") || rc=$?
  if [ "$rc" -eq 0 ]; then
    return 0
  fi
  if grep -qiE "$NOT_FOUND" "$WORK/stderr"; then
    return 1
  fi
  cat "$WORK/stderr" >&2
  die "this failed: $(printf '%q ' "$@")"
}

# helper COMMAND...: covalent_gcpbatch_plugin/deploy_helper.py of this checkout, run by --python.
helper() {
  PYTHONPATH="$ROOT/executor${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m covalent_gcpbatch_plugin.deploy_helper "$@"
}

wanted() {
  local step=$1
  [ -z "$ONLY" ] || [[ ",$ONLY," == *",$step,"* ]]
}

# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------

parse_args() {
  ACTION=${1:-}
  [ $# -eq 0 ] || shift
  case "$ACTION" in
    up | down | status | image) ;;
    -h | --help | help) usage; exit 0 ;;
    "") usage >&2; exit 2 ;;
    *) die "unknown command '$ACTION' (up, down, status or image)" ;;
  esac
  PROJECT=${GCPBATCH_PROJECT:-}
  REGION=${GCPBATCH_REGION:-us-east1}
  PREFIX=${GCPBATCH_PREFIX:-covalent-gcpbatch}
  PYTHON=${GCPBATCH_PYTHON:-python3}
  BUCKET=""
  TASK_BUCKET=""
  RETENTION_DAYS=7
  FUNCTION_RUNTIME=python311
  MAX_VCPUS="" MAX_MEMORY_MB="" MAX_TIME_LIMIT_S="" MAX_ACCELERATOR_COUNT="" ALLOWED_MACHINE_TYPES=""
  MAX_BOOT_DISK_SIZE_GB="" MAX_SCRATCH_DISK_GB="" MAX_PARALLEL_VCPUS=""
  MAX_KEEP_WARM_S="" MAX_WARM_VMS="" WARM_LIFETIME_S=""
  ALLOWED_MOUNT_BUCKETS="" ALLOWED_WRITABLE_MOUNT_BUCKETS="" ALLOWED_SECRETS=""
  ALLOWED_IMAGES="" IMAGE_SUFFIX="" REQUIREMENTS="" COVALENT_CONF=""
  ONLY=""
  YES=0
  while [ $# -gt 0 ]; do
    local flag=$1 value=""
    case "$flag" in
      --yes | -y | --help | -h) shift ;;
      --*=*) value=${flag#*=}; flag=${flag%%=*}; shift ;;
      --*) [ $# -ge 2 ] || die "$flag needs a value"; value=$2; shift 2 ;;
      *) die "unexpected argument '$flag' (see --help)" ;;
    esac
    case "$flag" in
      --project) PROJECT=$value ;;
      --region) REGION=$value ;;
      --prefix) PREFIX=$value ;;
      --bucket) BUCKET=$value ;;
      --task-bucket) TASK_BUCKET=$value ;;
      --python) PYTHON=$value ;;
      --retention-days) RETENTION_DAYS=$value ;;
      --function-runtime) FUNCTION_RUNTIME=$value ;;
      --max-vcpus) MAX_VCPUS=$value ;;
      --max-memory-mb) MAX_MEMORY_MB=$value ;;
      --max-time-limit-s) MAX_TIME_LIMIT_S=$value ;;
      --max-accelerator-count) MAX_ACCELERATOR_COUNT=$value ;;
      --max-boot-disk-size-gb) MAX_BOOT_DISK_SIZE_GB=$value ;;
      --max-scratch-disk-gb) MAX_SCRATCH_DISK_GB=$value ;;
      --max-parallel-vcpus) MAX_PARALLEL_VCPUS=$value ;;
      --allowed-machine-types) ALLOWED_MACHINE_TYPES=$value ;;
      --max-keep-warm-s) MAX_KEEP_WARM_S=$value ;;
      --max-warm-vms) MAX_WARM_VMS=$value ;;
      --warm-lifetime-s) WARM_LIFETIME_S=$value ;;
      --allowed-mount-buckets) ALLOWED_MOUNT_BUCKETS=$value ;;
      --allowed-writable-mount-buckets) ALLOWED_WRITABLE_MOUNT_BUCKETS=$value ;;
      --allowed-secrets) ALLOWED_SECRETS=$value ;;
      --allowed-images) ALLOWED_IMAGES=$value ;;
      --name) IMAGE_SUFFIX=$value ;;
      --requirements) REQUIREMENTS=$value ;;
      --covalent-conf) COVALENT_CONF=$value ;;
      --only) ONLY=$value ;;
      --yes | -y) YES=1 ;;
      --help | -h) usage; exit 0 ;;
      *) die "unknown option '$flag' (see --help)" ;;
    esac
  done
}

validate() {
  [ -n "$PROJECT" ] || die "no project: pass --project P (or set GCPBATCH_PROJECT)"
  [[ $PROJECT =~ ^[a-z][a-z0-9-]{4,28}[a-z0-9]$ ]] || die "'$PROJECT' is not a project id (6-30 of a-z, 0-9, -)"
  [[ $REGION =~ ^[a-z]+-[a-z]+[0-9]+$ ]] || die "'$REGION' is not a region (e.g. us-east1)"
  # Service account ids are at most 30 characters: <prefix>-runner must fit.
  [[ $PREFIX =~ ^[a-z][a-z0-9-]{1,21}[a-z0-9]$ ]] ||
    die "prefix '$PREFIX' must be 3-23 of a-z, 0-9 and -, starting with a letter"
  [[ $RETENTION_DAYS =~ ^[1-9][0-9]*$ ]] || die "--retention-days must be a whole number of days >= 1"
  [[ $FUNCTION_RUNTIME =~ ^python3[0-9]+$ ]] || die "--function-runtime must be a Python runtime (e.g. python311)"
  if [ "$ACTION" = image ]; then
    [[ $IMAGE_SUFFIX =~ ^[a-z0-9][a-z0-9-]{0,29}$ ]] ||
      die "image needs --name N (1-30 of a-z, 0-9 and -): the image is named worker-N"
    [ -f "$REQUIREMENTS" ] || die "image needs --requirements FILE (pip requirements of your tasks): '$REQUIREMENTS' is not a file"
    REQUIREMENTS=$(cd "$(dirname "$REQUIREMENTS")" && pwd)/$(basename "$REQUIREMENTS")
  fi
  local step steps allowed
  if [ "$ACTION" = down ]; then allowed=" ${DOWN_STEPS[*]} "; else allowed=" ${UP_STEPS[*]} "; fi
  IFS=, read -ra steps <<<"$ONLY"
  for step in "${steps[@]}"; do
    [[ $allowed == *" $step "* ]] || die "--only: unknown step '$step' for $ACTION (one of:$allowed)"
  done
  [[ $RETRY_BASE_S =~ ^[0-9]+$ ]] || die "COVALENT_GCPBATCH_DEPLOY_RETRY_BASE_S must be whole seconds (default 10)"
  command -v gcloud >/dev/null 2>&1 || die "the gcloud CLI is not on PATH: https://cloud.google.com/sdk/docs/install"
}

derive_names() {
  BUCKET=${BUCKET:-$PREFIX-$PROJECT}
  [[ $BUCKET =~ ^[a-z0-9][a-z0-9_.-]{1,61}[a-z0-9]$ ]] || die "bucket name '$BUCKET' is not valid: pass --bucket"
  # Task objects and pack manifests only: a storage trigger fires for every object of its bucket
  # and cannot filter by prefix, so results, logs and live output chunks live in BUCKET.
  TASK_BUCKET=${TASK_BUCKET:-$PREFIX-tasks-$PROJECT}
  [[ $TASK_BUCKET =~ ^[a-z0-9][a-z0-9_.-]{1,61}[a-z0-9]$ ]] || die "bucket name '$TASK_BUCKET' is not valid: pass --task-bucket"
  [ "$TASK_BUCKET" != "$BUCKET" ] || die "--task-bucket must differ from --bucket: outputs in the trigger's bucket would each fire the function"
  REPO=$PREFIX
  TOPIC=$PREFIX-jobs
  # Warm VMs (protocol/warm.py): the function publishes offers to WARM_TOPIC, and every warm VM
  # pulls them from the one shared WARM_SUBSCRIPTION. The function's defaults for its topic
  # (deployment.py warm_topic_path, warm_subscription_path), so they are not passed to it.
  WARM_TOPIC=$TOPIC-warm
  WARM_SUBSCRIPTION=$TOPIC-warm-offers
  FUNCTION=$PREFIX-submit
  # Cloud Build's source uploads (the worker image's and the function's), deleted after a day.
  STAGING_BUCKET=$PREFIX-build-$PROJECT
  RUNNER_SA=$PREFIX-runner@$PROJECT.iam.gserviceaccount.com
  FUNCTION_SA=$PREFIX-fn@$PROJECT.iam.gserviceaccount.com
  BUILD_SA=$PREFIX-build@$PROJECT.iam.gserviceaccount.com
  REGISTRY=$REGION-docker.pkg.dev/$PROJECT/$REPO
  ALLOWED_IMAGES=${ALLOWED_IMAGES:-$REGISTRY/worker*}
  IMAGE_NAME=worker${IMAGE_SUFFIX:+-$IMAGE_SUFFIX}
  IMAGE=""
  GCS_AGENT=""
  PUBSUB_AGENT=""
  PROJECT_NUMBER=""
}

# The worker image: its build context staged in $WORK/context (exactly what the Dockerfile copies,
# plus --requirements for `image`), tagged with the dispatching environment's Python and covalent
# versions and the context's digest, so a changed source, requirement or environment gets a new image.
resolve_image() {
  [ -z "$IMAGE" ] || return 0
  local versions context_digest
  versions=$(helper versions) ||
    die "could not ask '$PYTHON' for its Python and covalent versions: pass --python <the python you dispatch from>"
  read -r PY_VERSION COVALENT_VERSION <<<"$versions"
  context_digest=$(helper stage-context "$WORK/context" ${REQUIREMENTS:+--requirements "$REQUIREMENTS"}) ||
    die "could not stage the worker image's build context"
  IMAGE=$REGISTRY/$IMAGE_NAME:py$PY_VERSION-covalent$COVALENT_VERSION-$context_digest
}

resolve_gcs_agent() {
  [ -z "$GCS_AGENT" ] || return 0
  lookup gcloud storage service-agent --project="$PROJECT" || die "no Cloud Storage service agent in $PROJECT"
  GCS_AGENT=$FOUND
}

resolve_project_number() {
  [ -z "$PROJECT_NUMBER" ] || return 0
  lookup gcloud projects describe "$PROJECT" --format='value(projectNumber)' || die "project $PROJECT not found"
  [[ $FOUND =~ ^[0-9]+$ ]] || die "could not read the project number of $PROJECT"
  PROJECT_NUMBER=$FOUND
}

resolve_pubsub_agent() {
  resolve_project_number
  PUBSUB_AGENT=service-$PROJECT_NUMBER@gcp-sa-pubsub.iam.gserviceaccount.com
}

# ---------------------------------------------------------------------------------------------
# up: one function per resource
# ---------------------------------------------------------------------------------------------

ensure_apis() {
  section "APIs"
  lookup gcloud services list --enabled --project="$PROJECT" --format='value(config.name)' ||
    die "project $PROJECT not found (or you cannot see it): check --project and 'gcloud auth list'"
  local api missing=()
  for api in "${APIS[@]}"; do
    grep -qxF "$api" <<<"$FOUND" || missing+=("$api")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    present "all ${#APIS[@]} APIs enabled"
    return
  fi
  run gcloud services enable "${missing[@]}" --project="$PROJECT"
}

# ensure_bucket B LABEL: the bucket B, private, its objects under covalent-gcpbatch/ deleted
# after RETENTION_DAYS.
ensure_bucket() {
  local bucket=$1
  section "$2 gs://$bucket"
  helper lifecycle --days "$RETENTION_DAYS" >"$WORK/lifecycle.json"
  if lookup gcloud storage buckets describe "gs://$bucket" --project="$PROJECT" --raw --format=json; then
    local rc=0
    helper bucket-matches --days "$RETENTION_DAYS" <<<"$FOUND" || rc=$?
    case "$rc" in
      0) present "gs://$bucket (uniform access, public access prevention, ${RETENTION_DAYS}-day lifecycle)"; return ;;
      3) ;;
      *) die "could not read the settings of gs://$bucket" ;;
    esac
    run gcloud storage buckets update "gs://$bucket" --project="$PROJECT" \
      --uniform-bucket-level-access --public-access-prevention --lifecycle-file="$WORK/lifecycle.json"
    return
  fi
  run gcloud storage buckets create "gs://$bucket" --project="$PROJECT" --location="$REGION" \
    --uniform-bucket-level-access --public-access-prevention --lifecycle-file="$WORK/lifecycle.json"
}

ensure_staging_bucket() {
  section "Build staging bucket gs://$STAGING_BUCKET"
  if lookup gcloud storage buckets describe "gs://$STAGING_BUCKET" --project="$PROJECT" --format='value(name)'; then
    present "gs://$STAGING_BUCKET"
    return
  fi
  helper lifecycle --days 1 --everything >"$WORK/staging-lifecycle.json"
  run gcloud storage buckets create "gs://$STAGING_BUCKET" --project="$PROJECT" --location="$REGION" \
    --uniform-bucket-level-access --public-access-prevention --lifecycle-file="$WORK/staging-lifecycle.json"
}

ensure_repository() {
  section "Artifact Registry repository $REPO"
  if lookup gcloud artifacts repositories describe "$REPO" --location="$REGION" --project="$PROJECT" --format='value(name)'; then
    present "$REGION-docker.pkg.dev/$PROJECT/$REPO"
    return
  fi
  run gcloud artifacts repositories create "$REPO" --repository-format=docker --location="$REGION" \
    --project="$PROJECT" --description="covalent-gcpbatch worker images"
}

# ensure_topic T: the Pub/Sub topic T.
ensure_topic() {
  local topic=$1
  section "Pub/Sub topic $topic"
  if lookup gcloud pubsub topics describe "$topic" --project="$PROJECT" --format='value(name)'; then
    present "projects/$PROJECT/topics/$topic"
    return
  fi
  run gcloud pubsub topics create "$topic" --project="$PROJECT"
}

# The warm VMs' offers: one pull subscription that they all share (each offer names its VM).
# An offer is worth nothing after seconds (protocol/warm.py OFFER_TAKE_S), so: the shortest
# retention Pub/Sub allows (10 minutes), and the shortest ack deadline (10 s); and it never
# expires, or a deployment unused for 31 days (the default) would lose it.
ensure_warm_subscription() {
  section "Pub/Sub subscription $WARM_SUBSCRIPTION"
  if lookup gcloud pubsub subscriptions describe "$WARM_SUBSCRIPTION" --project="$PROJECT" --format='value(name)'; then
    present "projects/$PROJECT/subscriptions/$WARM_SUBSCRIPTION (of $WARM_TOPIC)"
    return
  fi
  run gcloud pubsub subscriptions create "$WARM_SUBSCRIPTION" --project="$PROJECT" --topic="$WARM_TOPIC" \
    --ack-deadline=10 --message-retention-duration=10m --expiration-period=never
}

ensure_topics() {
  ensure_topic "$TOPIC"
  ensure_topic "$WARM_TOPIC"
  ensure_warm_subscription
}

ensure_service_account() {
  local email=$1 description=$2
  section "Service account $email"
  if lookup gcloud iam service-accounts describe "$email" --project="$PROJECT" --format='value(email)'; then
    present "$email"
    return
  fi
  run gcloud iam service-accounts create "${email%%@*}" --project="$PROJECT" \
    --display-name="${email%%@*}" --description="$description"
}

ensure_accounts() {
  ensure_service_account "$RUNNER_SA" "covalent-gcpbatch: the Batch jobs run as this account"
  ensure_service_account "$FUNCTION_SA" "covalent-gcpbatch: the Cloud Function that creates the Batch jobs"
  ensure_service_account "$BUILD_SA" "covalent-gcpbatch: Cloud Build builds the worker image and the function as this account"
}

ensure_image() {
  resolve_image
  section "Worker image (Python $PY_VERSION, covalent $COVALENT_VERSION)"
  if lookup gcloud artifacts docker images describe "$IMAGE" --project="$PROJECT" --format='value(image_summary.digest)'; then
    present "$IMAGE"
    return
  fi
  helper build-config --image "$IMAGE" --python-version "$PY_VERSION" --covalent-version "$COVALENT_VERSION" \
    >"$WORK/cloudbuild.json"
  # Runs as the build account (projects created since mid-2024 give Cloud Build's default account
  # no roles), with the source staged in our own bucket and the logs in Cloud Logging.
  run_propagating build_propagating gcloud builds submit "$WORK/context" --project="$PROJECT" --region="$REGION" --config="$WORK/cloudbuild.json" \
    --service-account="projects/$PROJECT/serviceAccounts/$BUILD_SA" --gcs-source-staging-dir="gs://$STAGING_BUCKET/source"
}

# IAM: where a role is granted sets what an account can reach. iam_target KIND [CONDITION] sets
# IAM_GROUP (the gcloud command group), IAM_WHERE (flags locating the resource) and IAM_BIND
# (extra flags for add/remove). Only project grants take a condition (an IAM condition expression).
# Kinds: our own resources, and the user's that tasks may reach (mount: a bucket of
# --allowed-(writable-)mount-buckets; secret: a secret of --allowed-secrets, projects/P/secrets/S,
# located in its own project P), whose grants down removes since the resources stay.
iam_target() {
  IAM_WHERE=(--project="$PROJECT")
  IAM_BIND=()
  case "$1" in
    mount) IAM_GROUP=(storage buckets) ;;
    secret)
      local owner=${3#projects/}
      IAM_GROUP=(secrets); IAM_WHERE=(--project="${owner%%/*}") ;;
    project)
      IAM_GROUP=(projects); IAM_WHERE=()
      if [ -n "${2:-}" ]; then IAM_BIND=(--condition="expression=$2,title=$PREFIX-scope"); else IAM_BIND=(--condition=None); fi ;;
    bucket) IAM_GROUP=(storage buckets) ;;
    topic) IAM_GROUP=(pubsub topics) ;;
    subscription) IAM_GROUP=(pubsub subscriptions) ;;
    repo) IAM_GROUP=(artifacts repositories); IAM_WHERE+=(--location="$REGION") ;;
    account) IAM_GROUP=(iam service-accounts) ;;
    service) IAM_GROUP=(run services); IAM_WHERE+=(--region="$REGION") ;;
    *) die "iam_target: unknown kind $1" ;;
  esac
}

# has_binding KIND RESOURCE ROLE MEMBER [CONDITION]: 0 if bound (under exactly that condition
# expression, if given), 1 if not, 2 if the resource does not exist.
has_binding() {
  iam_target "$1" "${5:-}" "$2"
  lookup gcloud "${IAM_GROUP[@]}" get-iam-policy "$2" "${IAM_WHERE[@]}" --format=json || return 2
  local rc=0
  helper has-binding "$3" "$4" ${5:+--condition "$5"} <<<"$FOUND" || rc=$?
  case "$rc" in
    0) return 0 ;;
    3) return 1 ;;
    *) die "could not read the IAM policy of $1 $2" ;;
  esac
}

ensure_binding() {
  local kind=$1 resource=$2 role=$3 member=$4 condition=${5:-} rc=0
  has_binding "$kind" "$resource" "$role" "$member" "$condition" || rc=$?
  case "$rc" in
    0) present "$role for ${member#*:} on $kind $resource${condition:+ (if $condition)}"; return ;;
    2)
      case "$kind" in
        mount) die "bucket $resource (--allowed-mount-buckets or --allowed-writable-mount-buckets) does not exist or you cannot read its IAM policy: create it, or leave it out" ;;
        secret) die "secret $resource (--allowed-secrets) does not exist or you cannot read its IAM policy: create it (gcloud secrets create), or leave it out" ;;
        *) die "$kind $resource does not exist: run the step that creates it first" ;;
      esac ;;
  esac
  run_retrying gcloud "${IAM_GROUP[@]}" add-iam-policy-binding "$resource" "${IAM_WHERE[@]}" "${IAM_BIND[@]}" \
    --member="$member" --role="$role" --format=none
}

# The whole IAM plan, in one place: each_binding ACTION calls ACTION KIND RESOURCE ROLE MEMBER.
# The function's own run.invoker grant comes after it is deployed (ensure_function).
each_binding() {
  local action=$1 runner=serviceAccount:$RUNNER_SA fn=serviceAccount:$FUNCTION_SA build=serviceAccount:$BUILD_SA
  # The job runner: report to Batch, write logs, read its task from THIS task bucket, read and
  # create (never replace or delete) objects of THIS bucket, pull from THIS repository, publish
  # job notifications to THIS topic.
  "$action" project "$PROJECT" roles/batch.agentReporter "$runner"
  "$action" project "$PROJECT" roles/logging.logWriter "$runner"
  "$action" bucket "gs://$TASK_BUCKET" roles/storage.objectViewer "$runner"
  "$action" bucket "gs://$BUCKET" roles/storage.objectViewer "$runner"
  "$action" bucket "gs://$BUCKET" roles/storage.objectCreator "$runner"
  "$action" repo "$REPO" roles/artifactregistry.reader "$runner"
  "$action" topic "$TOPIC" roles/pubsub.publisher "$runner"
  # A warm VM (protocol/warm.py) pulls its offers from THIS subscription only (its idle records and
  # claims are objects it creates in BUCKET; its electrons' states go to TOPIC).
  "$action" subscription "$WARM_SUBSCRIPTION" roles/pubsub.subscriber "$runner"
  # What tasks may reach, each bucket or secret by name (deployment.py's allowlists, which the
  # function enforces): mounted buckets (gcsfuse reads as the VM's account: objectViewer read-only,
  # objectUser to write; https://cloud.google.com/storage/docs/cloud-storage-fuse/quickstart-mount-bucket),
  # and secrets, which "the job's service account" reads with roles/secretmanager.secretAccessor "on the
  # secret" (https://cloud.google.com/batch/docs/create-run-job-secret-manager).
  local item items=()
  IFS=, read -ra items <<<"$ALLOWED_MOUNT_BUCKETS"
  for item in "${items[@]}"; do "$action" mount "gs://$item" roles/storage.objectViewer "$runner"; done
  IFS=, read -ra items <<<"$ALLOWED_WRITABLE_MOUNT_BUCKETS"
  for item in "${items[@]}"; do "$action" mount "gs://$item" roles/storage.objectUser "$runner"; done
  IFS=, read -ra items <<<"$ALLOWED_SECRETS"
  for item in "${items[@]}"; do "$action" secret "$item" roles/secretmanager.secretAccessor "$runner"; done
  # The function: create Batch jobs that run as the runner account (and only it), read task
  # objects and cancel markers, record (create-only: never overwrite or delete) and publish why it
  # created no job for a task, receive Eventarc events.
  "$action" project "$PROJECT" roles/batch.jobsEditor "$fn"
  "$action" project "$PROJECT" roles/eventarc.eventReceiver "$fn"
  "$action" account "$RUNNER_SA" roles/iam.serviceAccountUser "$fn"
  "$action" bucket "gs://$TASK_BUCKET" roles/storage.objectViewer "$fn"
  "$action" bucket "gs://$BUCKET" roles/storage.objectViewer "$fn"
  "$action" bucket "gs://$BUCKET" roles/storage.objectCreator "$fn"
  "$action" topic "$TOPIC" roles/pubsub.publisher "$fn"
  # ...and offer electrons to warm VMs on THIS topic (their idle records it reads in BUCKET, and
  # creates the .taken records there).
  "$action" topic "$WARM_TOPIC" roles/pubsub.publisher "$fn"
  # The builds (worker image, function): write build logs, push to THIS repository, read the
  # sources staged in THIS staging bucket (the documented minimum for a custom build account).
  "$action" project "$PROJECT" roles/logging.logWriter "$build"
  "$action" repo "$REPO" roles/artifactregistry.writer "$build"
  "$action" bucket "gs://$STAGING_BUCKET" roles/storage.objectAdmin "$build"
  # The function's build reads its source from the bucket Cloud Functions copies it into,
  # gcf-v2-sources-<project number>-<region>, which does not exist before the first deploy: so a
  # project grant with a condition on that bucket's objects, not a grant on the bucket.
  resolve_project_number
  "$action" project "$PROJECT" roles/storage.objectViewer "$build" \
    "resource.name.startsWith(\"projects/_/buckets/gcf-v2-sources-$PROJECT_NUMBER-$REGION/\")"
  if [ "$action" != remove_binding ]; then
    # Storage triggers: Cloud Storage publishes the bucket's events to Eventarc's topic.
    resolve_gcs_agent
    "$action" project "$PROJECT" roles/pubsub.publisher "serviceAccount:$GCS_AGENT"
    # The trigger's push subscription authenticates as the function's account: the Pub/Sub agent
    # mints that token (granted by default only to agents created after April 2021; on that
    # account alone, not project-wide).
    resolve_pubsub_agent
    "$action" account "$FUNCTION_SA" roles/iam.serviceAccountTokenCreator "serviceAccount:$PUBSUB_AGENT"
  fi
}

ensure_bindings() {
  section "IAM roles"
  each_binding ensure_binding
}

# plan_function: the function's settings (env file) and deploy flags, in FUNCTION_DEPLOY, and
# FUNCTION_DIGEST, the digest of those and of functions/ that up records as a label on it.
plan_function() {
  local allowed=() images=() image
  IFS=, read -ra images <<<"$ALLOWED_IMAGES"
  for image in "${images[@]}"; do allowed+=(--allowed-image "$image"); done
  helper function-env --project "$PROJECT" --region "$REGION" --topic "$TOPIC" \
    --job-service-account "$RUNNER_SA" --task-bucket "$TASK_BUCKET" --bucket "$BUCKET" "${allowed[@]}" \
    --max-vcpus "$MAX_VCPUS" --max-memory-mb "$MAX_MEMORY_MB" --max-time-limit-s "$MAX_TIME_LIMIT_S" \
    --max-accelerator-count "$MAX_ACCELERATOR_COUNT" --allowed-machine-types "$ALLOWED_MACHINE_TYPES" \
    --max-boot-disk-size-gb "$MAX_BOOT_DISK_SIZE_GB" --max-scratch-disk-gb "$MAX_SCRATCH_DISK_GB" \
    --max-parallel-vcpus "$MAX_PARALLEL_VCPUS" \
    --max-keep-warm-s "$MAX_KEEP_WARM_S" --max-warm-vms "$MAX_WARM_VMS" --warm-lifetime-s "$WARM_LIFETIME_S" \
    --allowed-mount-buckets "$ALLOWED_MOUNT_BUCKETS" --allowed-writable-mount-buckets "$ALLOWED_WRITABLE_MOUNT_BUCKETS" \
    --allowed-secrets "$ALLOWED_SECRETS" >"$WORK/function-env.yaml"
  # As many gunicorn threads as requests an instance is sent (the Cloud Run functions docs' advice).
  printf 'THREADS: "%s"\n' "$FUNCTION_CONCURRENCY" >>"$WORK/function-env.yaml"
  FUNCTION_DEPLOY=(
    functions deploy "$FUNCTION" --gen2 --region="$REGION" --project="$PROJECT"
    --runtime="$FUNCTION_RUNTIME" --entry-point="$ENTRY_POINT"
    --trigger-event-filters="type=$FINALIZED" --trigger-event-filters="bucket=$TASK_BUCKET"
    --trigger-location="$REGION" --retry
    --service-account="$FUNCTION_SA" --trigger-service-account="$FUNCTION_SA"
    --build-service-account="projects/$PROJECT/serviceAccounts/$BUILD_SA"
    --docker-repository="projects/$PROJECT/locations/$REGION/repositories/$REPO" --stage-bucket="$STAGING_BUCKET"
    --ingress-settings=internal-only --no-allow-unauthenticated
    --cpu="$FUNCTION_CPU" --memory="$FUNCTION_MEMORY" --concurrency="$FUNCTION_CONCURRENCY"
    --max-instances="$FUNCTION_MAX_INSTANCES" --timeout=180s
  )
  FUNCTION_DIGEST=$(helper digest --text "${FUNCTION_DEPLOY[*]}" "$WORK/function-env.yaml" "$ROOT/functions")
}

# deployed_digest: the digest label of the deployed function ("" if there is none).
deployed_digest() {
  DEPLOYED=""
  if lookup gcloud functions describe "$FUNCTION" --region="$REGION" --project="$PROJECT" \
    --format='value(labels.deploy_digest)'; then
    DEPLOYED=${FOUND:-unlabelled}
  fi
}

ensure_function() {
  section "Cloud Function $FUNCTION"
  plan_function
  deployed_digest
  if [ "$DEPLOYED" = "$FUNCTION_DIGEST" ]; then
    present "$FUNCTION (trigger: $FINALIZED on gs://$TASK_BUCKET)"
  else
    [ -z "$DEPLOYED" ] || printf '   %s exists, but its source or settings changed: redeploying\n' "$FUNCTION"
    run_propagating function_propagating gcloud "${FUNCTION_DEPLOY[@]}" --source="$ROOT/functions" --env-vars-file="$WORK/function-env.yaml" \
      --update-labels="managed-by=covalent-gcpbatch,deploy_digest=$FUNCTION_DIGEST"
  fi
  # Eventarc calls the (private) function as the trigger's service account.
  ensure_binding service "$FUNCTION" roles/run.invoker "serviceAccount:$FUNCTION_SA"
}

# The keys a deployment writes (settings.DEPLOYMENT_KEYS; a test keeps this list equal to it).
# The emulator keys are cleared so that a config left behind by `covalent-gcpbatch local up`
# cannot send tasks to a local emulator.
write_config() {
  resolve_image
  section "Covalent config"
  local pairs=(project_id="$PROJECT" region="$REGION" bucket_name="$BUCKET" task_bucket_name="$TASK_BUCKET"
    container_image_uri="$IMAGE" service_account_email="$RUNNER_SA" pubsub_topic="$TOPIC"
    pubsub_emulator_host= storage_emulator_host= batch_api_endpoint=)
  if [ -n "$COVALENT_CONF" ]; then
    helper conf-file "$COVALENT_CONF" "${pairs[@]}"  # covalent deploy reads it into its config
  else
    helper config-set "${pairs[@]}"
    helper config-show
  fi
}

cmd_up() {
  local step
  plan_function  # the function's settings are checked (deployment.py) before anything is changed
  for step in "${UP_STEPS[@]}"; do
    wanted "$step" || continue
    case "$step" in
      apis) ensure_apis ;;
      bucket) ensure_bucket "$BUCKET" Bucket; ensure_bucket "$TASK_BUCKET" "Task bucket"; ensure_staging_bucket ;;
      repo) ensure_repository ;;
      topic) ensure_topics ;;
      accounts) ensure_accounts ;;
      image) ensure_image ;;
      iam) ensure_bindings ;;
      function) ensure_function ;;
      config) write_config ;;
    esac
  done
  section "Done"
  echo "Deployment '$PREFIX' in $PROJECT ($REGION) is up."
  if wanted config; then
    echo "Restart the Covalent server ('covalent restart') so that it reads the new configuration."
  fi
}

# ---------------------------------------------------------------------------------------------
# down
# ---------------------------------------------------------------------------------------------

confirm_down() {
  [ "$YES" = 1 ] && return 0
  [ -t 0 ] || die "down deletes the deployment, including every object in gs://$BUCKET: without a terminal to ask on, pass --yes"
  local answer
  printf 'This deletes deployment %s in project %s, including every object in gs://%s.\n' "$PREFIX" "$PROJECT" "$BUCKET"
  read -r -p "Type the project id to confirm: " answer
  [ "$answer" = "$PROJECT" ] || die "not confirmed: nothing was deleted"
}

remove_config() {
  section "Covalent config"
  if [ -n "$COVALENT_CONF" ]; then
    rm -f "$COVALENT_CONF"
    return
  fi
  helper config-unset --if-bucket "$BUCKET"  # every key a deployment writes (settings.DEPLOYMENT_KEYS)
}

delete_function() {
  section "Cloud Function $FUNCTION"
  if lookup gcloud functions describe "$FUNCTION" --region="$REGION" --project="$PROJECT" --format='value(name)'; then
    run gcloud functions delete "$FUNCTION" --region="$REGION" --project="$PROJECT" --quiet
  else
    printf '   absent: %s\n' "$FUNCTION"
  fi
}

# Project-level grants outlive the accounts they name, so they go first, and so do the grants on
# the user's buckets and secrets (mount, secret), which stay. Grants on our resources go with
# them. The Cloud Storage service agent keeps roles/pubsub.publisher: any storage
# trigger in the project needs it.
# shellcheck disable=SC2317  # called through each_binding
remove_binding() {
  local kind=$1 resource=$2 role=$3 member=$4 condition=${5:-}
  case "$kind" in project | mount | secret) ;; *) return 0 ;; esac
  has_binding "$kind" "$resource" "$role" "$member" "$condition" || return 0
  run gcloud "${IAM_GROUP[@]}" remove-iam-policy-binding "$resource" "${IAM_WHERE[@]}" --member="$member" --role="$role" \
    "${IAM_BIND[@]}" --format=none
}

remove_bindings() {
  section "IAM roles (project level)"
  each_binding remove_binding
}

delete_service_account() {
  local email=$1
  section "Service account $email"
  if lookup gcloud iam service-accounts describe "$email" --project="$PROJECT" --format='value(email)'; then
    run gcloud iam service-accounts delete "$email" --project="$PROJECT" --quiet
  else
    printf '   absent: %s\n' "$email"
  fi
}

delete_accounts() {
  delete_service_account "$FUNCTION_SA"
  delete_service_account "$RUNNER_SA"
  delete_service_account "$BUILD_SA"
}

# delete_topic T: the Pub/Sub topic T.
delete_topic() {
  local topic=$1
  section "Pub/Sub topic $topic"
  if lookup gcloud pubsub topics describe "$topic" --project="$PROJECT" --format='value(name)'; then
    run gcloud pubsub topics delete "$topic" --project="$PROJECT"
  else
    printf '   absent: %s\n' "$topic"
  fi
}

# The subscription before its topic: a topic's deletion leaves its subscriptions behind.
delete_topics() {
  section "Pub/Sub subscription $WARM_SUBSCRIPTION"
  if lookup gcloud pubsub subscriptions describe "$WARM_SUBSCRIPTION" --project="$PROJECT" --format='value(name)'; then
    run gcloud pubsub subscriptions delete "$WARM_SUBSCRIPTION" --project="$PROJECT"
  else
    printf '   absent: %s\n' "$WARM_SUBSCRIPTION"
  fi
  delete_topic "$WARM_TOPIC"
  delete_topic "$TOPIC"
}

delete_repository() {
  section "Artifact Registry repository $REPO (and its images)"
  if lookup gcloud artifacts repositories describe "$REPO" --location="$REGION" --project="$PROJECT" --format='value(name)'; then
    run gcloud artifacts repositories delete "$REPO" --location="$REGION" --project="$PROJECT" --quiet
  else
    printf '   absent: %s\n' "$REPO"
  fi
}

delete_bucket() {
  local bucket
  for bucket in "$BUCKET" "$TASK_BUCKET" "$STAGING_BUCKET"; do
    section "Bucket gs://$bucket (and its objects)"
    if lookup gcloud storage buckets describe "gs://$bucket" --project="$PROJECT" --format='value(name)'; then
      run gcloud storage rm --recursive "gs://$bucket" --project="$PROJECT"
    else
      printf '   absent: gs://%s\n' "$bucket"
    fi
  done
}

cmd_down() {
  confirm_down
  local step
  for step in "${DOWN_STEPS[@]}"; do
    wanted "$step" || continue
    case "$step" in
      config) remove_config ;;
      function) delete_function ;;
      iam) remove_bindings ;;
      accounts) delete_accounts ;;
      topic) delete_topics ;;
      repo) delete_repository ;;
      bucket) delete_bucket ;;
    esac
  done
  section "Done"
  echo "Deployment '$PREFIX' in $PROJECT is down. The APIs stay enabled, and the Cloud Storage service"
  echo "agent keeps its pubsub.publisher grant (any storage trigger needs it)."
}

# ---------------------------------------------------------------------------------------------
# status
# ---------------------------------------------------------------------------------------------

MISSING=0
report() {
  local label=$1
  shift
  local rc=0
  lookup "$@" || rc=$?
  if [ "$rc" -eq 0 ]; then
    printf '   present  %s\n' "$label"
  else
    printf '   MISSING  %s\n' "$label"
    MISSING=$((MISSING + 1))
  fi
}

report_binding() {
  local rc=0
  has_binding "$@" || rc=$?
  local where="$1 $2${5:+ (if $5)}"
  if [ "$rc" -eq 0 ]; then
    printf '   present  %s -> %s on %s\n' "$3" "${4#*:}" "$where"
  else
    printf '   MISSING  %s -> %s on %s\n' "$3" "${4#*:}" "$where"
    MISSING=$((MISSING + 1))
  fi
}

cmd_status() {
  resolve_image
  section "Resources of '$PREFIX' in $PROJECT ($REGION)"
  report "bucket gs://$BUCKET" gcloud storage buckets describe "gs://$BUCKET" --project="$PROJECT" --format='value(name)'
  report "task bucket gs://$TASK_BUCKET" gcloud storage buckets describe "gs://$TASK_BUCKET" --project="$PROJECT" --format='value(name)'
  report "bucket gs://$STAGING_BUCKET" gcloud storage buckets describe "gs://$STAGING_BUCKET" --project="$PROJECT" --format='value(name)'
  report "repository $REPO" gcloud artifacts repositories describe "$REPO" --location="$REGION" --project="$PROJECT" --format='value(name)'
  report "image $IMAGE" gcloud artifacts docker images describe "$IMAGE" --project="$PROJECT" --format='value(image_summary.digest)'
  report "topic $TOPIC" gcloud pubsub topics describe "$TOPIC" --project="$PROJECT" --format='value(name)'
  report "topic $WARM_TOPIC" gcloud pubsub topics describe "$WARM_TOPIC" --project="$PROJECT" --format='value(name)'
  report "subscription $WARM_SUBSCRIPTION" gcloud pubsub subscriptions describe "$WARM_SUBSCRIPTION" --project="$PROJECT" --format='value(name)'
  report "account $RUNNER_SA" gcloud iam service-accounts describe "$RUNNER_SA" --project="$PROJECT" --format='value(email)'
  report "account $FUNCTION_SA" gcloud iam service-accounts describe "$FUNCTION_SA" --project="$PROJECT" --format='value(email)'
  report "account $BUILD_SA" gcloud iam service-accounts describe "$BUILD_SA" --project="$PROJECT" --format='value(email)'
  plan_function
  deployed_digest
  if [ -z "$DEPLOYED" ]; then
    printf '   MISSING  function %s\n' "$FUNCTION"
    MISSING=$((MISSING + 1))
  elif [ "$DEPLOYED" = "$FUNCTION_DIGEST" ]; then
    printf '   present  function %s (up to date)\n' "$FUNCTION"
  else
    printf '   present  function %s (OUT OF DATE: its source or settings changed; up redeploys it)\n' "$FUNCTION"
  fi
  if [ "$MISSING" -eq 0 ]; then
    section "IAM roles"
    each_binding report_binding
    report_binding service "$FUNCTION" roles/run.invoker "serviceAccount:$FUNCTION_SA"
  fi
  section "Covalent config"
  helper config-show
  if [ "$MISSING" -ne 0 ]; then
    printf '\n%s missing: run ./deploy.sh up --project %s --region %s --prefix %s\n' "$MISSING" "$PROJECT" "$REGION" "$PREFIX"
    return 1
  fi
}

# image: a worker image with the user's packages, beside the default one in the repository.
cmd_image() {
  lookup gcloud iam service-accounts describe "$BUILD_SA" --project="$PROJECT" --format='value(email)' ||
    die "no deployment '$PREFIX' in $PROJECT (its build account is missing): run ./deploy.sh up first"
  ensure_image
  section "Done"
  echo "Run tasks on it: ct.executor.GCPBatchExecutor(container_image_uri=\"$IMAGE\")"
  echo "(or set container_image_uri in [executors.gcpbatch]). The function allows it if its allowlist"
  echo "covers it: the default allows every worker image in $REGISTRY."
}

main() {
  parse_args "$@"
  validate
  derive_names
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  # Never let gcloud stop to ask: every answer is in the flags (down asks once, above).
  export CLOUDSDK_CORE_DISABLE_PROMPTS=1
  case "$ACTION" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    image) cmd_image ;;
  esac
}

# On one line: bash reads a script as it runs it, so nothing after this may be read (or edited).
main "$@"; exit
