#!/bin/sh
# One-shot job of docker-compose.yml (image minio/mc): once MinIO answers, create the bucket,
# the policy deploy/s3/user-policy.json and the dbops user with that policy. Idempotent.
# Secrets stay off command lines: the admin credentials travel in MC_HOST_minio (environment),
# the dbops keys on stdin.
set -eu
: "${S3_ENDPOINT:?}" "${S3_BUCKET:?}" "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}"
: "${DBOPS_S3_ACCESS_KEY:?}" "${DBOPS_S3_SECRET_KEY:?}"

export MC_HOST_minio="${S3_ENDPOINT%%://*}://${MINIO_ROOT_USER}:${MINIO_ROOT_PASSWORD}@${S3_ENDPOINT#*://}"

tries=0
until mc ls minio >/dev/null 2>&1; do
    tries=$((tries + 1))
    if [ "$tries" -ge 120 ]; then
        echo "minio-setup: MinIO did not answer at $S3_ENDPOINT within 120 s" >&2
        exit 1
    fi
    sleep 1
done

mc mb --ignore-existing "minio/$S3_BUCKET"
mc admin policy create minio dbops /deploy/s3/user-policy.json
printf '%s\n%s\n' "$DBOPS_S3_ACCESS_KEY" "$DBOPS_S3_SECRET_KEY" | mc admin user add minio >/dev/null
# Attaching an already attached policy is an error; what counts is that it is attached.
mc admin policy attach minio dbops --user "$DBOPS_S3_ACCESS_KEY" >/dev/null 2>&1 || true
if ! mc admin user info minio "$DBOPS_S3_ACCESS_KEY" | grep -q 'PolicyName: .*dbops'; then
    echo "minio-setup: policy dbops is not attached to user $DBOPS_S3_ACCESS_KEY" >&2
    exit 1
fi
echo "minio-setup: bucket $S3_BUCKET and user $DBOPS_S3_ACCESS_KEY (policy dbops) ready"
