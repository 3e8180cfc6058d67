# token-exchange: the two commands a newcomer needs are `make run` and `make test`.
# Both install what is missing first (scripts/setup.sh is idempotent and quiet when all is there).

CARGO ?= cargo
# `make run PROFILE=release` for an optimised gateway (a much longer first build).
PROFILE ?= dev
CARGO_TEST_FLAGS ?= --workspace --no-fail-fast

.PHONY: all setup setup-system build run test lint clean-test-dbs help

all: build

help:
	@echo "make run    build and run the gateway on the embedded SQLite database (data/)"
	@echo "make test   install test prerequisites (cmake, .venv with openai) and run every test"
	@echo "make build  build the binaries"
	@echo "make lint   clippy with the project's lints, warnings as errors"
	@echo "make setup  install prerequisites only"

# Build prerequisites plus the Python venv the SDK tests use.
setup:
	@scripts/setup.sh

# Only what building and running needs.
setup-system:
	@scripts/setup.sh --system

build: setup-system
	$(CARGO) build --profile $(PROFILE) --bins

# Runs `token-exchange serve` with conf/token-exchange.toml: gateway :8080, admin :8081, metrics :9090.
# The first start creates data/token-exchange.db, a master key in data/ and the `admin` user
# (password printed once unless TOKEX_ADMIN_PASSWORD is set).
run: setup-system
	$(CARGO) run --profile $(PROFILE) --bin token-exchange -- serve

test: setup
	$(CARGO) test $(CARGO_TEST_FLAGS)

# The code rules CI enforces: rustfmt, and no unwrap/expect/panic/println outside tests, no warnings.
lint: setup-system
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Databases left behind on MariaDB by killed test runs (the tests also drop these themselves).
clean-test-dbs:
	@mysql -h 127.0.0.1 -u root -N -e "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE 'tokex\\_t\\_%'" \
		| while read -r db; do mysql -h 127.0.0.1 -u root -e "DROP DATABASE \`$$db\`"; done
