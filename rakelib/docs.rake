# frozen_string_literal: true

desc "Regenerate the tables generated from the config schema (README.md, docs/configuration.md, docs/protocol.md section 13)"
task :docs do
  ruby "bin/sync-docs"
end
