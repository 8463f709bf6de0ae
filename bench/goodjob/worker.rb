# frozen_string_literal: true

# `good_job start` from GoodJob's own bundle (BUNDLE_GEMFILE=bench/goodjob/Gemfile,
# RUBYOPT=-rbundler/setup), with bench/goodjob as the working directory: what
# the gem's executable does, found through the bundle rather than a binstub.
require "good_job/cli"

GoodJob::CLI.within_exe = true
GoodJob::CLI.log_to_stdout = true
GoodJob::CLI.start(ARGV)
