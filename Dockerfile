# The image for every node (cluster.yaml's docker.image, and KubeRay: k8s/rayjob*.yaml,
# k8s/mlflow.yaml): Ray's GPU image plus this repo and its runtime requirements at the versions CI
# passed with (constraints.txt), so a rebuild installs the same torch (CUDA 13.0 wheels: GPU
# nodes need NVIDIA driver >= 580). The test tools (pytest, ruff, grad-cam, selenium, moto:
# requirements.txt) stay out. One immutable tag per commit, never :latest (head and workers must
# run the same code):
#   tag=$(git rev-parse --short=12 HEAD)
#   docker build -t <registry>/cycle:$tag . && docker push <registry>/cycle:$tag
# The base: pin it by digest too, so that a rebuild cannot pick up a re-pushed tag. CHANGE BASE to
# the digest you have checked, from `docker buildx imagetools inspect rayproject/ray:2.60.0-py311-gpu`
# (this repository cannot look it up: its machines have no registry access):
#   docker build --build-arg BASE=rayproject/ray:2.60.0-py311-gpu@sha256:<digest> -t ... .
ARG BASE=rayproject/ray:2.60.0-py311-gpu
FROM ${BASE}
WORKDIR /home/ray/cycle
COPY requirements-runtime.txt constraints.txt ./
# boto3: MLflow's S3 artifacts; psycopg2: MLflow's Postgres store (the cluster's head).
RUN pip install --no-cache-dir -r requirements-runtime.txt -c constraints.txt \
    && pip install --no-cache-dir 'boto3>=1.26' 'psycopg2-binary>=2.9' -c constraints.txt
COPY --chown=ray:users . .
