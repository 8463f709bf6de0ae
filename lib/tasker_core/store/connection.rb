# frozen_string_literal: true

module TaskerCore
  module Store
    # One PostgreSQL connection (the class and its waits are in C:
    # ext/tasker_core/store_class.c). This file adds parameter encoding and
    # transactions. Not for two threads at once: take one from
    # TaskerCore::Store.with_connection.
    class Connection
      # exec(sql, params = []) -> Array of Hashes (string keys). Parameters:
      # nil, true/false, Integer, Float, String (ASCII-8BIT Strings are sent
      # as binary values, e.g. for bytea), Symbol, Time, and Arrays of those
      # (sent as PostgreSQL array literals: cast them, e.g. $1::bigint[]).
      def exec(sql, params = [])
        _exec(sql, params.map { |p| encode_param(p) })
      end

      # Runs the block inside BEGIN/COMMIT; any exception rolls back and is
      # re-raised. Inside an open transaction it just yields (no savepoints).
      def transaction
        return yield(self) if in_transaction?

        exec("BEGIN")
        begin
          result = yield(self)
        rescue Exception # rubocop:disable Lint/RescueException -- roll back on Timeout/Interrupt too
          rollback_quietly
          raise
        end
        exec("COMMIT")
        result
      end

      private

      def rollback_quietly
        exec("ROLLBACK") if usable?
      rescue Error
        nil
      end

      def encode_param(value) = ParamEncoding.encode(value)
    end

    # How the store sends Ruby values as PostgreSQL text parameters (shared
    # with ActiveRecordDatabase::SharedConnection).
    module ParamEncoding
      module_function

      def encode(value)
        case value
        when nil, String then value
        when true then "t"
        when false then "f"
        when Integer, Float, Symbol then value.to_s
        when Time then value.utc.strftime("%Y-%m-%d %H:%M:%S.%6N+00")
        when Array then "{#{value.map { |e| array_element(e) }.join(',')}}"
        else raise TypeError, "cannot send a #{value.class} to PostgreSQL"
        end
      end

      def array_element(value)
        case value
        when nil then "NULL"
        when Array then encode(value)
        when String
          if value.encoding == Encoding::BINARY
            %("\\\\x#{value.unpack1('H*')}")
          else
            %("#{value.gsub(/["\\]/) { |c| "\\#{c}" }}")
          end
        else %("#{encode(value)}")
        end
      end
    end
  end
end
