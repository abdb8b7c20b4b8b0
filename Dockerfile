# constellationd in an image built from nothing: one statically linked binary.
# Build it with `scripts/cluster build` (or by hand):
#   RUSTFLAGS="-C target-feature=+crt-static" cargo build --release \
#     --target x86_64-unknown-linux-gnu -p constellationd
#   mkdir -p target/docker && cp target/x86_64-unknown-linux-gnu/release/constellationd target/docker/
#   docker build -t constellationd:local -f Dockerfile target/docker
FROM scratch
COPY constellationd /usr/local/bin/constellationd
ENV PATH=/usr/local/bin
# PID 1: constellationd handles SIGTERM and SIGINT itself (leave beacon,
# goodbye on every link, socket removed), so `docker stop` is quick.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/constellationd"]
CMD ["run"]
