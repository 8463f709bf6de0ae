# frozen_string_literal: true

# `tasker worker ...` or `tasker orchestrator ...` from this bundle, with
# bench/activejob_tasker as the working directory: the command boots the
# app (config/environment.rb) first, so the worker runs its jobs.
load Gem.bin_path("tasker_core", "tasker")
