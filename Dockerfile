# The miniproxy image: miniproxy, both iptables backends, conntrack.
#
#   docker build -t miniproxy:dev .
#
# The entrypoint (deploy/image/entrypoint.sh) makes iptables use the backend
# the node already uses (nf_tables or legacy) and then runs miniproxy with
# the container's arguments, e.g. --config=/var/lib/kube-proxy/config.conf
# or --cleanup-kube-proxy. See docs/deploy.md.

# Build: a static binary, so that the runtime image needs no Go and no libc
# of a particular version.
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/miniproxy ./cmd/miniproxy

# Run: Debian 12, as the machines miniproxy is tested on. iptables brings
# both backends (iptables-nft and iptables-legacy) and update-alternatives
# to choose one; kmod lets legacy iptables load its modules from the node's
# /lib/modules; conntrack is for operators (conntrack -L inside the pod).
FROM debian:12-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables conntrack kmod \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/miniproxy /usr/local/bin/miniproxy
COPY deploy/image/entrypoint.sh /usr/local/bin/miniproxy-entrypoint
RUN chmod 0755 /usr/local/bin/miniproxy-entrypoint
ENTRYPOINT ["/usr/local/bin/miniproxy-entrypoint"]
