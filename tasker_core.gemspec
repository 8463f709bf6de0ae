# frozen_string_literal: true

require_relative "lib/tasker_core/version"

Gem::Specification.new do |spec|
  spec.name = "tasker_core"
  spec.version = TaskerCore::VERSION
  spec.summary = "Durable DAG workflows for Ruby: PostgreSQL state, batched dispatch over ZeroMQ, a C core"
  spec.description = <<~DESC
    tasker_core runs workflows (tasks made of steps that form a DAG) with PostgreSQL as the
    source of truth. A C extension claims ready steps in batches, publishes them over ZeroMQ
    to Ruby worker processes and writes their streamed results back in batches.
  DESC
  spec.authors = ["tasker_core developers"]
  spec.license = "MIT"
  spec.required_ruby_version = ">= 3.0"

  # Everything under lib/ (the install generator's *.tt templates, the
  # dashboard's views) but a compiled extension left there by `rake compile`;
  # spec/gem_install_spec.rb checks the built .gem holds what the generator,
  # the Railtie, the CLI and the dashboard read.
  spec.files = Dir[
    "lib/**/*", "ext/tasker_core/*.{c,h,rb}", "config/**/*.yml", "db/migrate/*.sql",
    "docs/**/*.{md,svg,png}", "exe/*", "examples/order_fulfilment/**/*.{rb,yml}",
    "README.md", "CHANGELOG.md", "LICENSE"
  ].reject { |f| File.directory?(f) || f.match?(/\.(so|bundle|dll|o)\z/) }
  spec.bindir = "exe"
  spec.executables = Dir["exe/*"].map { |f| File.basename(f) }
  spec.require_paths = ["lib"]
  spec.extensions = ["ext/tasker_core/extconf.rb"]
  spec.metadata["rubygems_mfa_required"] = "true"

  spec.add_dependency "json_schemer", "~> 2.0" # task templates' context_schema
  # Recurring tasks' cron expressions (TaskerCore::Recurring): the parser
  # GoodJob and Solid Queue use, with time zones and next/previous times.
  spec.add_dependency "fugit", "~> 1.11"
  # TaskerCore::Web, the dashboard: a Rack app (request parsing, escaping, the
  # interface Rails' `mount` and every Ruby server speak); Rack 2 (Rails 7.0)
  # and Rack 3 both work ...
  spec.add_dependency "rack", ">= 2.2.4", "< 4"
  # ... served on its own by `tasker web` with WEBrick (pure Ruby, kept by the
  # Ruby core team, enough for an operator's dashboard) through Rack's handler:
  # in Rack 3 it lives in rackup 2; rackup 1 is the empty shim for Rack 2.
  spec.add_dependency "rackup", ">= 1.0", "< 3"
  spec.add_dependency "webrick", "~> 1.8"
end
