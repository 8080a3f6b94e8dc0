#!/usr/bin/env bash
# Credentials of the local/dev overlay: generated on this machine, stored only as Kubernetes Secrets.
#
#   k8s/overlays/local/create-secrets.sh init          create every Secret the local overlay and flyte-binary use
#   k8s/overlays/local/create-secrets.sh rotate WHAT   new value for one credential, WHAT one of
#       minio-root minio-mlflow minio-flyte minio-tasks postgres-superuser postgres-mlflow postgres-flyte mlflow-tls
#
# One credential per service (k8s/secrets/*.example.yaml lists them): the MinIO root keys and the Postgres superuser
# stay with MinIO/Postgres and their bootstrap; MLflow, flyte-binary and the task pods each get their own MinIO user
# (bucket-scoped) and Postgres role. Every value comes from `openssl rand`, reaches kubectl on stdin (never as a
# command-line argument) and is never written inside the repository: the throw-away CA key of the MLflow TLS
# certificate lives in a temporary directory that is deleted on exit.
#
# Needs kubectl (current context: the dev cluster; namespaces created), openssl >= 1.1.1 and base64.
# Namespaces: PLATFORM_NS (default m2d2), TASK_NS (m2d2-development), FLYTE_NS (flyte).
set -euo pipefail
umask 077

PLATFORM_NS=${PLATFORM_NS:-m2d2}
TASK_NS=${TASK_NS:-m2d2-development}
FLYTE_NS=${FLYTE_NS:-flyte}
MLFLOW_HOST=mlflow.${PLATFORM_NS}.svc.cluster.local
PG_HOST=postgres.${PLATFORM_NS}.svc.cluster.local:5432
MANAGER=m2d2-create-secrets
# MinIO access keys (user names) of the services; their secret keys are generated.
MINIO_ROOT_USER=m2d2-root
MINIO_MLFLOW_USER=mlflow
MINIO_FLYTE_USER=flyte
MINIO_TASKS_USER=m2d2-tasks

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

die() { echo "create-secrets.sh: $*" >&2; exit 1; }
# 24 random bytes as hex (48 characters); MinIO secret keys must be at most 40 characters, so they take 16 bytes.
rand() { openssl rand -hex "${1:-24}"; }

# put_secret NAMESPACE NAME TYPE KEY VALUE [KEY VALUE ...] - create or replace the whole Secret (server-side apply
# from stdin; the values pass through printf and base64's stdin only).
put_secret() {
  local ns=$1 name=$2 type=$3
  shift 3
  {
    printf 'apiVersion: v1\nkind: Secret\nmetadata:\n  name: %s\n  namespace: %s\n' "$name" "$ns"
    printf '  labels:\n    app.kubernetes.io/part-of: m2d2\ntype: %s\ndata:\n' "$type"
    while [ $# -gt 0 ]; do
      printf '  %s: %s\n' "$1" "$(printf '%s' "$2" | base64 | tr -d '\n')"
      shift 2
    done
  } | kubectl apply --server-side --force-conflicts --field-manager="$MANAGER" -f - >/dev/null
  echo "secret $ns/$name"
}

# get_key NAMESPACE NAME KEY - one decoded value of an existing Secret.
get_key() {
  kubectl -n "$1" get secret "$2" -o "jsonpath={.data.${3//./\\.}}" | base64 -d
}

secret_exists() { kubectl -n "$1" get secret "$2" >/dev/null 2>&1; }

# psql_superuser - run the SQL on stdin as the Postgres superuser inside the database pod (local socket).
psql_superuser() {
  kubectl -n "$PLATFORM_NS" exec -i postgres-0 -- \
    sh -c 'psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet --username "$POSTGRES_USER" --dbname postgres'
}

put_mlflow_db() {  # role password of "mlflow" -> Secret mlflow-db
  put_secret "$PLATFORM_NS" mlflow-db Opaque \
    backend-store-uri "postgresql+psycopg2://mlflow:$1@$PG_HOST/mlflow"
}

put_mlflow_auth() {  # role password, admin password, Flask key -> Secret mlflow-auth
  local ini
  ini=$(printf '[mlflow]\ndefault_permission = READ\ndatabase_uri = %s\nadmin_username = admin\nauthorization_function = %s\n' \
    "postgresql+psycopg2://mlflow:$1@$PG_HOST/mlflow_auth" "mlflow.server.auth:authenticate_request_basic_auth")
  put_secret "$PLATFORM_NS" mlflow-auth Opaque \
    admin-password "$2" flask-secret-key "$3" basic_auth.ini "$ini"
}

put_task_env() {  # pipeline's MLflow password, MinIO m2d2-tasks secret key -> Secret m2d2-task-env
  put_secret "$TASK_NS" m2d2-task-env Opaque \
    MLFLOW_TRACKING_USERNAME m2d2-pipeline MLFLOW_TRACKING_PASSWORD "$1" \
    AWS_ACCESS_KEY_ID "$MINIO_TASKS_USER" AWS_SECRET_ACCESS_KEY "$2" \
    FLYTE_AWS_ACCESS_KEY_ID "$MINIO_TASKS_USER" FLYTE_AWS_SECRET_ACCESS_KEY "$2"
}

# issue_tls - a new throw-away CA and a server certificate for the MLflow Service (and localhost, for
# kubectl port-forward) in $WORK; the CA key is deleted with $WORK.
issue_tls() {
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 825 \
    -subj "/CN=m2d2 local MLflow CA" -keyout "$WORK/ca.key" -out "$WORK/ca.crt" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$MLFLOW_HOST" \
    -keyout "$WORK/tls.key" -out "$WORK/tls.csr" 2>/dev/null
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth" \
    "subjectAltName=DNS:mlflow,DNS:mlflow.$PLATFORM_NS,DNS:mlflow.$PLATFORM_NS.svc,DNS:$MLFLOW_HOST,DNS:localhost,IP:127.0.0.1" \
    >"$WORK/server.ext"
  openssl x509 -req -days 397 -in "$WORK/tls.csr" -CA "$WORK/ca.crt" -CAkey "$WORK/ca.key" -CAcreateserial \
    -extfile "$WORK/server.ext" -out "$WORK/tls.crt" 2>/dev/null
  rm -f "$WORK/ca.key"
}

# put_tls [PREVIOUS_CA_PEM] - Secret mlflow-tls, and Secret mlflow-ca in the task namespace. On rotation the bundle
# keeps the previous CA next to the new one, so task pods trust the server before and after it restarts.
put_tls() {
  local bundle
  bundle=$(cat "$WORK/ca.crt")
  if [ -n "${1:-}" ]; then
    bundle=$(printf '%s\n%s\n' "$bundle" "$(printf '%s\n' "$1" | sed -n '1,/-----END CERTIFICATE-----/p')")
  fi
  put_secret "$PLATFORM_NS" mlflow-tls kubernetes.io/tls \
    tls.crt "$(cat "$WORK/tls.crt")" tls.key "$(cat "$WORK/tls.key")" ca.crt "$(cat "$WORK/ca.crt")"
  put_secret "$TASK_NS" mlflow-ca Opaque ca.crt "$bundle"
}

cmd_init() {
  local s
  for s in "$PLATFORM_NS/postgres" "$PLATFORM_NS/minio" "$PLATFORM_NS/mlflow-auth" "$TASK_NS/m2d2-task-env" \
    "$FLYTE_NS/flyte-db"; do
    if secret_exists "${s%%/*}" "${s#*/}"; then
      die "Secret $s exists already: this cluster is initialised (use: rotate WHAT, k8s/README.md)"
    fi
  done
  local pg_super pg_mlflow pg_flyte minio_root s3_mlflow s3_flyte s3_tasks admin flask pipeline
  pg_super=$(rand); pg_mlflow=$(rand); pg_flyte=$(rand)
  minio_root=$(rand 16); s3_mlflow=$(rand 16); s3_flyte=$(rand 16); s3_tasks=$(rand 16)
  admin=$(rand); flask=$(rand 32); pipeline=$(rand)

  put_secret "$PLATFORM_NS" postgres Opaque username postgres password "$pg_super"
  put_secret "$PLATFORM_NS" postgres-roles Opaque mlflow-password "$pg_mlflow" flyte-password "$pg_flyte"
  put_secret "$PLATFORM_NS" minio Opaque root-user "$MINIO_ROOT_USER" root-password "$minio_root"
  put_secret "$PLATFORM_NS" mlflow-s3 Opaque access-key-id "$MINIO_MLFLOW_USER" secret-access-key "$s3_mlflow"
  put_secret "$PLATFORM_NS" minio-flyte Opaque access-key-id "$MINIO_FLYTE_USER" secret-access-key "$s3_flyte"
  put_secret "$PLATFORM_NS" minio-tasks Opaque access-key-id "$MINIO_TASKS_USER" secret-access-key "$s3_tasks"
  put_mlflow_db "$pg_mlflow"
  put_mlflow_auth "$pg_mlflow" "$admin" "$flask"
  put_secret "$FLYTE_NS" flyte-db Opaque password "$pg_flyte"
  put_task_env "$pipeline" "$s3_tasks"
  issue_tls
  put_tls
  cat <<EOF
Done. Next (k8s/README.md): helm install flyte-binary with the keys of Secret $PLATFORM_NS/minio-flyte, then
kubectl apply -k k8s/overlays/local, then create the MLflow user m2d2-pipeline with the password of
Secret $TASK_NS/m2d2-task-env (MLFLOW_TRACKING_PASSWORD).
EOF
}

# rotate_minio_user SECRET USER - new secret key for a MinIO service user (the bootstrap Job applies it).
rotate_minio_user() {
  local key pipeline=""
  key=$(rand 16)
  if [ "$1" = minio-tasks ]; then
    pipeline=$(get_key "$TASK_NS" m2d2-task-env MLFLOW_TRACKING_PASSWORD)
  fi
  put_secret "$PLATFORM_NS" "$1" Opaque access-key-id "$2" secret-access-key "$key"
  if [ "$1" = minio-tasks ]; then
    put_task_env "$pipeline" "$key"
  fi
  cat <<EOF
Now apply it to MinIO (the old key stops working at once):
  kubectl -n $PLATFORM_NS delete job minio-bootstrap --ignore-not-found && kubectl apply -k k8s/overlays/local
EOF
}

# rotate_role ROLE - new password for a Postgres service role: set in the database, then in every Secret holding it.
rotate_role() {
  local pw other admin flask
  pw=$(rand)
  # Read everything that is kept before changing anything, so that a failed read changes nothing.
  if [ "$1" = mlflow ]; then
    other=$(get_key "$PLATFORM_NS" postgres-roles flyte-password)
    admin=$(get_key "$PLATFORM_NS" mlflow-auth admin-password)
    flask=$(get_key "$PLATFORM_NS" mlflow-auth flask-secret-key)
  else
    other=$(get_key "$PLATFORM_NS" postgres-roles mlflow-password)
  fi
  printf "ALTER ROLE %s PASSWORD '%s';\n" "$1" "$pw" | psql_superuser
  if [ "$1" = mlflow ]; then
    put_secret "$PLATFORM_NS" postgres-roles Opaque mlflow-password "$pw" flyte-password "$other"
    put_mlflow_db "$pw"
    put_mlflow_auth "$pw" "$admin" "$flask"
    echo "Now: kubectl -n $PLATFORM_NS rollout restart deployment/mlflow"
  else
    put_secret "$PLATFORM_NS" postgres-roles Opaque mlflow-password "$other" flyte-password "$pw"
    put_secret "$FLYTE_NS" flyte-db Opaque password "$pw"
    echo "Now: kubectl -n $FLYTE_NS rollout restart deployment/flyte-backend-flyte-binary"
  fi
}

cmd_rotate() {
  case "${1:-}" in
    minio-root)
      put_secret "$PLATFORM_NS" minio Opaque root-user "$MINIO_ROOT_USER" root-password "$(rand 16)"
      echo "Now: kubectl -n $PLATFORM_NS rollout restart deployment/minio"
      ;;
    minio-mlflow)
      rotate_minio_user mlflow-s3 "$MINIO_MLFLOW_USER"
      echo "  then: kubectl -n $PLATFORM_NS rollout restart deployment/mlflow"
      ;;
    minio-flyte)
      rotate_minio_user minio-flyte "$MINIO_FLYTE_USER"
      echo "  then: helm upgrade flyte-binary with the new keys of Secret $PLATFORM_NS/minio-flyte (k8s/README.md)"
      ;;
    minio-tasks)
      rotate_minio_user minio-tasks "$MINIO_TASKS_USER"
      echo "  new task pods read the new keys from Secret $TASK_NS/m2d2-task-env"
      ;;
    postgres-superuser)
      local pw user
      pw=$(rand)
      user=$(get_key "$PLATFORM_NS" postgres username)
      printf "ALTER ROLE \"%s\" PASSWORD '%s';\n" "$user" "$pw" | psql_superuser
      put_secret "$PLATFORM_NS" postgres Opaque username "$user" password "$pw"
      ;;
    postgres-mlflow) rotate_role mlflow ;;
    postgres-flyte) rotate_role flyte ;;
    mlflow-tls)
      local previous=""
      if secret_exists "$TASK_NS" mlflow-ca; then previous=$(get_key "$TASK_NS" mlflow-ca ca.crt); fi
      issue_tls
      put_tls "$previous"
      cat <<EOF
Now wait until the task pods see the new CA bundle (kubelet refreshes mounted Secrets within about a minute), then:
  kubectl -n $PLATFORM_NS rollout restart deployment/mlflow
EOF
      ;;
    *) die "rotate what? one of: minio-root minio-mlflow minio-flyte minio-tasks postgres-superuser postgres-mlflow postgres-flyte mlflow-tls" ;;
  esac
}

case "${1:-}" in
  init) cmd_init ;;
  rotate) cmd_rotate "${2:-}" ;;
  *) die "usage: $0 init | rotate WHAT" ;;
esac
