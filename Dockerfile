# The operator image: `docker build -t dmr-operator .` (used by the chart and the kind e2e tier).
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.12-slim
COPY --from=build /install /usr/local
# A numeric non-root user, so the chart's runAsNonRoot can be verified by the kubelet.
USER 65532:65532
ENV PYTHONUNBUFFERED=1
ENTRYPOINT ["dmr-operator"]
CMD ["run", "--all-namespaces", "--log-format", "json"]
