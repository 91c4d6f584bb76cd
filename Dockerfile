# One image for the API and the workers. GPU workers: build with a CUDA torch, e.g.
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 -t cbd-factory .
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 CBD_DATA_DIR=/data
WORKDIR /app
RUN pip install --index-url ${TORCH_INDEX} torch
COPY pyproject.toml README.md ./
COPY cbd_engine cbd_engine
COPY cbd_cli cbd_cli
COPY cbd_client cbd_client
COPY app app
COPY worker worker
COPY migrations migrations
COPY alembic.ini ./
RUN pip install -e '.[server,eval,data,export]'  # editable: alembic.ini and migrations/ stay beside the code; eval and data:
# the workers' Rouge-L and evaluation, and dataset.hf; export: llama.cpp and ONNX Runtime GenAI (exports)
EXPOSE 8000
CMD ["cbd", "serve", "--host", "0.0.0.0"]
