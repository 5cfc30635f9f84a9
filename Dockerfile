# The image for KubeRay (k8s/rayjob*.yaml): Ray's GPU image plus this repo and its requirements.
#   docker build -t <registry>/cycle:latest . && docker push <registry>/cycle:latest
FROM rayproject/ray:2.60.0-py311-gpu
WORKDIR /home/ray/cycle
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY --chown=ray:users . .
