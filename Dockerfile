# The edgebridge container image: a static binary on an empty base.
#
# It packages what `deploy/build-image --stage` puts in dist/rootfs (the binary, built for
# x86_64-unknown-linux-musl; the shipped plugins, policies and examples; a CA bundle), so
# building it pulls no base image and needs no network:
#
#   deploy/build-image                          # stages dist/ and builds localhost/edgebridge:dev
#   deploy/build-image --stage && podman build -t edgebridge .   # or: docker build -t edgebridge .
FROM scratch

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="edgebridge" \
      org.opencontainers.image.description="MQTT bridge host with WebAssembly plugins: MqttBridgeConnector / MqttBridgeTopicMap YAML, at-least-once forwarding" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/edgebridge/edgebridge" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY dist/rootfs/ /

# Everything the bridge reads is a volume (the documented default paths):
#   /etc/edgebridge/config      the connector and topic-map YAML (watched: live reload)
#   /etc/edgebridge/plugins     *.wasm (watched: hot reload)
#   /etc/edgebridge/policies    plugin policies
#   /etc/edgebridge/secrets     one folder per Kubernetes Secret named in the YAML
#   /etc/edgebridge/configmaps  one folder per ConfigMap (CA trust bundles)
# The shipped plugins, policies and examples are in /usr/share/edgebridge.
VOLUME ["/etc/edgebridge/config", "/etc/edgebridge/plugins", "/etc/edgebridge/policies", "/etc/edgebridge/secrets", "/etc/edgebridge/configmaps"]
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 65532:65532
# 9102: /metrics, /healthz, /readyz, /status. 1883, 1884: the embedded brokers of the default
# command (the quick start).
EXPOSE 9102 1883 1884
ENTRYPOINT ["/usr/bin/edgebridge"]
CMD ["run", "-f", "/usr/share/edgebridge/examples/container-quickstart.yaml", "--http", "0.0.0.0:9102"]
