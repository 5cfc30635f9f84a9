# The image for KubeRay (k8s/rayjob*.yaml, k8s/mlflow.yaml): Ray's GPU image plus this repo and
# its runtime requirements at the versions CI passed with (constraints.txt), so a rebuild installs
# the same torch (CUDA 13.0 wheels: GPU nodes need NVIDIA driver >= 580). The test tools
# (pytest, ruff, grad-cam, selenium: requirements.txt) stay out.
#   docker build -t <registry>/cycle:latest . && docker push <registry>/cycle:latest
FROM rayproject/ray:2.60.0-py311-gpu
WORKDIR /home/ray/cycle
COPY requirements-runtime.txt constraints.txt ./
RUN pip install --no-cache-dir -r requirements-runtime.txt -c constraints.txt
COPY --chown=ray:users . .
