# The SuperLink's public face: nginx passing Flower's Fleet API only (Control and Runtime get 403).
# docker/fleet-proxy.conf is `python -m fedlora.simulations.cli.fleet_proxy ...` (its header says how).
#   docker build -f docker/fleet-proxy.Dockerfile -t fedlora-fleet-proxy .
# Another Debian/Ubuntu base: --build-arg BASE=IMAGE (docker/build-local.sh passes its local one).
ARG BASE=debian:bookworm-slim

FROM ${BASE}
RUN apt-get update && apt-get install -y --no-install-recommends nginx-light \
    && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/* \
    && mkdir -p /var/lib/fleet-proxy/tmp/body /var/lib/fleet-proxy/tmp/proxy /var/lib/fleet-proxy/tmp/fastcgi \
                /var/lib/fleet-proxy/tmp/uwsgi /var/lib/fleet-proxy/tmp/scgi \
    && chown -R nobody /var/lib/fleet-proxy/tmp
COPY docker/fleet-proxy.conf /etc/fedlora/fleet-proxy.conf
EXPOSE 9093
# the master reads the mounted certificate and key as root; its workers run as nobody
ENTRYPOINT ["nginx", "-p", "/var/lib/fleet-proxy", "-c", "/etc/fedlora/fleet-proxy.conf", "-e", "/dev/stderr"]
