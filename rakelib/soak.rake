# frozen_string_literal: true

desc "Soak: kills, pauses, connection churn, oversized and deep payloads and a non-reading " \
     "subscriber for SOAK_SECONDS (default 600); not part of bin/test (bench/soak/soak.rb)"
task soak: :compile do
  sh Gem.ruby, "bench/soak/soak.rb"
end
