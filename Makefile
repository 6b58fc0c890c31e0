# Thin shortcuts over `sow`, npm and the test command (see README). `make help` lists them.
SOW := .venv/bin/sow
SOW_HOME ?= $(HOME)/.local/share/sow

.PHONY: help install run test start-infra start-backend start-frontend start-all stop-all logs

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 18

install: ## install everything: .venv, servers, the dashboard build
	bash scripts/install

run: install ## install, then run the whole hub (live Bybit, or SIMULATED data when unreachable)
	$(SOW) up --infra --source auto

test: install ## install, then every check and test (what CI runs)
	bash scripts/check

start-infra: ## start NATS, Redis and QuestDB (sow infra up)
	$(SOW) infra up

start-backend: ## publish + cache + persist + serve-api on running servers (sow up)
	$(SOW) up --source auto

start-frontend: ## the dashboard with hot reload on http://localhost:3000/market
	cd frontend && NEXT_PUBLIC_SOW_API=$${NEXT_PUBLIC_SOW_API:-http://localhost:8080} npm run dev

start-all: ## servers and every stage (sow up --infra)
	$(SOW) up --infra --source auto

stop-all: ## stop the servers that sow infra started
	$(SOW) infra down

logs: ## follow the servers' logs
	tail -n 100 -F $(SOW_HOME)/logs/*.log
